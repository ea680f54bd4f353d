"""Benchmark: one rollout step (sample + grade + update) on a fixed tiny workload, side by side with
transformers' ``generate`` and (if installed: ``pip install -e '.[bench]'``) TRL's GRPOTrainer.

Workload: P=16 questions x K=8 answers, up to 32 new tokens, a Qwen2 of hidden size 128 and 4 layers, 2 CPU threads,
one optimizer step over all 128 answers (TRL: loss_type "dapo", beta 0, so no extra old-log-prob pass).

    python benchmarks/rollout_step.py [--model models/base] [--repeats 5] [--no-trl]

Prints medians over the repeats. Any other process on the cores ruins the figures: check the load first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

P, K, NEW_TOKENS, THREADS = 16, 8, 32, 2


def build_model(path: str | None):
    """The base model if given, else a random Qwen2 (hidden 128, 4 layers) with the synthetic tokenizer."""
    from nft.modeling import load_policy

    if path:
        return load_policy(path)
    from nft.data.synthetic import SyntheticConfig
    from nft.modeling import ModelConfig
    from nft.pretrain import PretrainConfig, run_pretrain

    out = Path(tempfile.mkdtemp()) / "bench-model"
    # the workload model: hidden 128, 4 layers (~1.07M parameters, as the TRL measurement it compares to)
    arch = ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=512)
    run_pretrain(SyntheticConfig(train_size=2000, eval_size=30), arch,
                 PretrainConfig(steps=1, batch_size=2, warmup=1, tokenizer_corpus=1000), out, progress=False)
    return load_policy(str(out))


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    fn()  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="save_pretrained folder (default: random tiny Qwen2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-trl", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from nft.data.prompts import render_prompt
    from nft.data.synthetic import SyntheticConfig, build_splits
    from nft.reward import GraderPool
    from nft.rollout.torch_sampler import TorchSampler
    from nft.train.config import TrainConfig
    from nft.train.engines import TorchEngine
    from nft.train.rollout import collect_rollout
    from nft.train.seeds import Cursor
    from nft.train.update import update

    model, tok = build_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    problems = build_splits(SyntheticConfig(train_size=2000, eval_size=30))["train"]
    prompts = [render_prompt(tok, p.question) for p in problems[:P]]
    print(f"model: Qwen2 {model.config.hidden_size}x{model.config.num_hidden_layers}, {n_params:,} parameters; "
          f"workload P={P} K={K} <= {NEW_TOKENS} new tokens, {THREADS} threads")

    # 1. transformers generate
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, attn = enc["input_ids"].repeat_interleave(K, 0), enc["attention_mask"].repeat_interleave(K, 0)

    def hf_generate():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=NEW_TOKENS, pad_token_id=tok.pad_token_id)
        gen = out[:, ids.shape[1]:]
        stop = torch.isin(gen, torch.tensor([tok.pad_token_id, tok.eos_token_id]))
        # tokens up to and including the first stop token
        first = torch.where(stop.any(-1), stop.float().argmax(-1) + 1, torch.full((gen.shape[0],), gen.shape[1]))
        return int(first.sum())

    t_gen, n_gen = median_time(hf_generate, args.repeats)
    sampler = TorchSampler(model, tok)
    t_ours, ro = median_time(lambda: sampler.sample(prompts, K, max_new_tokens=NEW_TOKENS, seed=0), args.repeats)
    n_ours = int(ro.mask.sum())
    print(f"sampling   generate: {t_gen:.3f} s, {n_gen / t_gen:,.0f} tokens/s | ours: {t_ours:.3f} s, "
          f"{n_ours / t_ours:,.0f} tokens/s | speed-up {n_ours / t_ours / (n_gen / t_gen):.2f}x")

    # 2. our full rollout step: sample + grade + one optimizer step over all 128 answers
    cfg = TrainConfig(prompts_per_step=P, answers_per_prompt=K, mini_batch_prompts=P, micro_batch_size=P * K,
                      max_new_tokens=NEW_TOKENS, lr=1e-6, tracking=False, threads=THREADS)
    engine = TorchEngine(model, cfg)
    splits = []
    with GraderPool(2) as pool:
        def ours_step():
            cursor = Cursor(P, 0)
            t0 = time.perf_counter()
            batch, m = collect_rollout(sampler, tok, problems[:P], cursor, pool, cfg, "all", 0, 0)
            u = update(engine, batch, "dapo", {}, cfg, tok.pad_token_id, 0, 0)
            t2 = time.perf_counter()
            splits.append((m["time/sample"], m["time/grade"], u["time/old_logprob"], u["time/update"], t2 - t0))
            return t2 - t0

        t_step, _ = median_time(ours_step, args.repeats)
    med = [statistics.median(s[i] for s in splits[1:]) for i in range(5)]
    print(f"ours       rollout step: {t_step:.3f} s  (sample {med[0]:.3f} / grade {med[1]:.3f} / "
          f"old-logprob {med[2]:.3f} / update {med[3]:.3f})")

    if args.no_trl:
        return 0
    try:
        t_trl = trl_step(model, tok, prompts, problems[:P], args.repeats)
    except ImportError as e:
        print(f"TRL        not installed ({e}); `pip install -e '.[bench]'` to compare")
        return 0
    print(f"TRL 1.16   GRPOTrainer step: {t_trl:.3f} s | ours / TRL = {t_step / t_trl:.2f}")
    return 0


def trl_step(model, tok, prompts, problems, repeats: int) -> float:
    """Median seconds per GRPOTrainer step on the same workload (on-policy: one update per generation)."""
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nft.reward import grade

    golds = {render: p.answer for render, p in zip(prompts, problems)}

    def reward(prompts, completions, **kw):
        return [float(grade(c, golds.get(p, ""))) for p, c in zip(prompts, completions)]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=P * K, num_generations=K,
                         max_completion_length=NEW_TOKENS, gradient_accumulation_steps=1, beta=0.0,
                         loss_type="dapo", learning_rate=1e-6, max_steps=repeats + 1, logging_steps=1000,
                         save_strategy="no", report_to=[], temperature=1.0, use_cpu=True, seed=0, bf16=False,
                         dataloader_num_workers=0, disable_tqdm=True)
        ds = Dataset.from_dict({"prompt": prompts * (repeats + 2)})
        trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=reward, args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Timer()])
        trainer.train()
    return statistics.median(times[1:])


if __name__ == "__main__":
    sys.exit(main())
