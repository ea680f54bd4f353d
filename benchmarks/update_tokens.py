"""Benchmark: the update (old log-probs + one optimizer step) with micro-batches of a fixed number of answers padded
to the batch's longest answer, against micro-batches by tokens (``train.micro_batch_tokens``: balanced sets, each cut
to its own longest answer), on answers of spread-out lengths, as RL answers are (the paper's run from a few hundred
to 3,584 tokens). Both take the same step: the largest weight difference is printed.

Workload: the rollout benchmark's large model (random Qwen2 256 x 4), P x K = 64 x 8 rows, prompts of the synthetic
task, answer lengths drawn uniformly from 8..128 (seeded) or all 128 (``--lengths full``: nothing to cut, the cost
of the split alone). The token budget is set so that both plans run about the same number of micro-batches.

    python benchmarks/update_tokens.py [--runs 3] [--lengths spread,full] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
THREADS = 2
P, K, T, MICRO = 64, 8, 128, 64


def make_batch(tok, lengths: str, seed: int = 0) -> dict:
    from nft.data.prompts import render_prompt
    from nft.data.synthetic import SyntheticConfig, build_splits

    problems = build_splits(SyntheticConfig(train_size=2000, eval_size=30))["train"][:P]
    prompts = tok([render_prompt(tok, p.question) for p in problems], add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    n = torch.tensor([T if lengths == "full" else rng.randint(8, T) for _ in range(P * K)])
    mask = (torch.arange(T)[None] < n[:, None]).float()
    g = torch.Generator().manual_seed(seed)
    response = torch.randint(3, len(tok), (P * K, T), generator=g) * mask.long()
    return {
        "prompt_ids": [prompts[q] for q in range(P) for _ in range(K)],
        "response": response,
        "mask": mask,
        "sampler_logprobs": -torch.rand(P * K, T, generator=g) * mask,
        "rewards": torch.tensor([float(rng.random() < 0.5) for _ in range(P * K)], dtype=torch.float64),
        "lengths": n,
        "group_ids": torch.arange(P * K) // K,
    }


def one_update(state, model, cfg, batch, pad_id) -> tuple[float, dict]:
    from nft.train.engines import TorchEngine
    from nft.train.update import update

    model.load_state_dict(state)
    engine = TorchEngine(model, cfg)
    t0 = time.perf_counter()
    update(engine, copy.deepcopy(batch), "nft", {}, cfg, pad_id, seed=0, step=0)
    return time.perf_counter() - t0, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lengths", default="spread,full")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from benchmarks.rollout_step import build_model
    from nft.train.config import TrainConfig
    from nft.train.plan import seq_lengths

    model, tok = build_model(None, 256, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for lengths in args.lengths.split(","):
        batch = make_batch(tok, lengths)
        budget = max(T + 64, int(seq_lengths(batch).sum()) * MICRO // (P * K))  # about as many micro-batches
        common = dict(
            prompts_per_step=P,
            answers_per_prompt=K,
            mini_batch_prompts=P,
            max_new_tokens=T,
            lr=1e-4,
            warmup_steps=1,
            tracking=False,
            threads=THREADS,
        )
        padded = TrainConfig(micro_batch_size=MICRO, **common)
        tokens = TrainConfig(micro_batch_tokens=budget, **common)
        fill = float(batch["lengths"].sum()) / (P * K * T)
        times = {"padded": [], "tokens": []}
        diff = 0.0
        for _ in range(args.runs):  # alternated, so drifts of the machine hit both alike
            ta, wa = one_update(state, model, padded, batch, tok.pad_token_id)
            tb, wb = one_update(state, model, tokens, batch, tok.pad_token_id)
            times["padded"].append(ta)
            times["tokens"].append(tb)
            diff = max(diff, max(float((wa[k] - wb[k]).abs().max()) for k in wa))
        row = {
            "lengths": lengths,
            "answer_fill": fill,
            "budget": budget,
            "padded_s": times["padded"],
            "tokens_s": times["tokens"],
            "max_weight_diff": diff,
        }
        rows.append(row)
        print(
            f"{lengths}: answers fill {fill:.0%} of P x K x T; padded {statistics.median(times['padded']):.2f} s, "
            f"tokens {statistics.median(times['tokens']):.2f} s; max weight difference {diff:.1e}",
            flush=True,
        )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {THREADS} threads"
    print(f"\n{args.runs} runs, median [min-max]; {machine}; torch {torch.__version__}")
    print(
        "| answer lengths | fill | padded, micro-batches of 64 answers (s) | by tokens (s) | tokens / padded | max weight diff |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["padded_s"], r["tokens_s"]
        ratios = [y / x for x, y in zip(a, b)]
        span = lambda v, f: f"{f(statistics.median(v))} [{f(min(v))}-{f(max(v))}]"
        print(
            f"| {'8-128 uniform' if r['lengths'] == 'spread' else 'all 128'} | {r['answer_fill']:.0%} | "
            f"{span(a, '{:.2f}'.format)} | {span(b, '{:.2f}'.format)} | {span(ratios, '{:.2f}'.format)}x | "
            f"{r['max_weight_diff']:.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
