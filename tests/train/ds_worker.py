"""Run under a launcher (``deepspeed --num_gpus 2 tests/train/ds_worker.py ...``): one rollout step's update on a
fixed batch with the DeepSpeed engine (3 mini-batches = 3 optimizer steps); rank 0 writes the losses and the model.

:func:`fixed_batch` and :data:`CFG` are shared with the one-process reference in ``test_deepspeed.py``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from nft.train.config import TrainConfig  # noqa: E402

#: 6 questions x 4 answers, 2 questions per optimizer step -> 3 optimizer steps; micro-batches of 3 answers (a rank's
#: 4 answers of a mini-batch take 2 micro-batches, one process's 8 take 3)
CFG = TrainConfig(
    prompts_per_step=6,
    answers_per_prompt=4,
    mini_batch_prompts=2,
    micro_batch_size=3,
    max_new_tokens=12,
    lr=3e-3,
    warmup_steps=2,
    tracking=False,
    threads=1,
)


def config(tokens: int = 0) -> TrainConfig:
    """:data:`CFG`, or with micro-batches of ``tokens`` tokens (verl's dynamic batch size)."""
    return replace(CFG, micro_batch_tokens=tokens) if tokens else CFG


REWARDS = [[1, 0, 0, 1], [0, 1, 1, 1], [1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 0, 1], [0, 1, 0, 0]]


def fixed_batch(model, tokenizer, drop: tuple[int, ...] = ()) -> dict:
    """A rollout batch sampled with a fixed seed, rewards from a fixed pattern (every group mixed); ``drop`` removes
    rows (uneven groups: ranks then get different numbers of micro-batches, as with RFT's positives)."""
    from nft.data.prompts import render_prompt
    from nft.rollout.torch_sampler import TorchSampler

    prompts = [
        render_prompt(tokenizer, f"What is {a} + {b}?")
        for a, b in [(3, 4), (12, 7), (25, 31), (8, 9), (40, 2), (6, 66)]
    ]
    ro = TorchSampler(model, tokenizer).sample(
        prompts, CFG.answers_per_prompt, max_new_tokens=CFG.max_new_tokens, seed=1234
    )
    batch = {
        "prompt_ids": ro.prompt_ids,
        "response": ro.response,
        "mask": ro.mask,
        "sampler_logprobs": ro.logprobs,
        "rewards": torch.tensor(REWARDS, dtype=torch.float64).flatten(),
        "lengths": ro.lengths,
        "group_ids": torch.arange(6).repeat_interleave(4),
    }
    keep = [i for i in range(24) if i not in drop]
    return {k: [v[i] for i in keep] if isinstance(v, list) else v[keep] for k, v in batch.items()}


def poisoned(question: int, rank: int = 0):
    """``nft.train.update.policy_loss`` whose loss is NaN, on process ``rank``, for every micro-batch holding rows of
    ``question`` (a non-finite gradient on one rank only: the step must still be skipped on every rank)."""
    from nft.algorithms import policy_loss
    from nft.dist import Dist

    def nan_loss(algo, **kw):
        loss, met = policy_loss(algo, **kw)
        if Dist().rank == rank and bool((kw["group_ids"] == question).any()):
            loss = loss * float("nan")
        return loss, met

    return nan_loss


def push_peak(engine) -> dict:
    """Walk the ZeRO-3 push (:meth:`DeepSpeedEngine.iter_weights`) and record, at every pair, the bytes of the
    partitioned parameters gathered at that moment (persistent small ones excluded: they are never partitioned)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = [p for p in engine.module.parameters() if not getattr(p, "ds_persist", False)]
    peak, pairs = 0, 0
    for _name, _t in engine.iter_weights():
        pairs += 1
        live = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
        peak = max(peak, sum(p.ds_numel * p.element_size() for p in live))
    return {
        "peak_gathered": peak,
        "largest": max(p.ds_numel * p.element_size() for p in params),
        "limit": engine.cfg.push_bucket_mb * 2**20,
        "total": sum(p.ds_numel * p.element_size() for p in params),
        "pairs": pairs,
        "names": len(list(engine.module.state_dict())),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--algo", default="nft")
    ap.add_argument("--drop", default="", help="comma-separated rows to remove from the batch")
    ap.add_argument("--tokens", type=int, default=0, help="train.micro_batch_tokens (0: micro_batch_size)")
    ap.add_argument(
        "--chunk-mb", type=float, default=0, help="train.logprob_chunk_mb, below the config's floor (a tiny vocabulary)"
    )
    ap.add_argument("--push-mb", type=float, default=0, help="only walk a push of buckets this size (ZeRO-3)")
    ap.add_argument("--poison", type=int, default=-1, help="a question whose losses are NaN on rank 0 (-1: none)")
    ap.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher (LOCAL_RANK is read)")
    args = ap.parse_args()
    from nft.dist import leave
    from nft.modeling import load_policy
    from nft.train.ds_config import model_config, resolve_deepspeed_config
    from nft.train.engines import DeepSpeedEngine, init_distributed
    from nft.train.update import update

    torch.set_num_threads(1)
    dist = init_distributed("deepspeed")
    torch.manual_seed(0)
    model, tok = load_policy(args.model)
    drop = tuple(int(x) for x in args.drop.split(",") if x)
    batch = dist.broadcast(fixed_batch(model, tok, drop) if dist.is_main else None)
    cfg = config(args.tokens)
    if args.chunk_mb:  # the chunked head under ZeRO-3's hooks: chunks of a few tokens of the tiny vocabulary
        cfg = replace(cfg)  # a copy: config() may return the shared CFG
        cfg.logprob_chunk_mb = args.chunk_mb
    ds = resolve_deepspeed_config(args.ds_config, cfg, dist.world, model_config(args.model))
    if args.push_mb:
        engine = DeepSpeedEngine(model, replace(cfg, push_bucket_mb=args.push_mb), ds)
        res = push_peak(engine)
        if dist.is_main:
            (Path(args.out) / "result.json").write_text(json.dumps(res))
        leave()
        return
    engine = DeepSpeedEngine(model, cfg, ds)
    trace: list[float] = []
    if args.poison >= 0:
        import nft.train.update

        nft.train.update.policy_loss = poisoned(args.poison)
    metrics = update(engine, batch, args.algo, {}, cfg, tok.pad_token_id, seed=0, step=0, trace=trace)
    out = Path(args.out)
    engine.save_model(out / "model", tok)
    if dist.is_main:
        (out / "result.json").write_text(
            json.dumps({"losses": trace, "metrics": metrics, "world": dist.world, "stage": engine.stage})
        )
    leave()


if __name__ == "__main__":
    main()
