"""Benchmark: the torch sampler with and without cascade decoding, per workload, against the bytes it saves.

The sampler decodes by cascade attention (prompt keys/values read once per prompt) when the prompt bytes plain
decoding would re-read per layer and step exceed ``CASCADE_MIN_BYTES`` (``TorchSampler._use_cascade``). This prints,
for each workload, those bytes, the seconds per sampling call with cascade off and on (alternated in one process,
median [min-max] of ``--runs``), the speed-up, whether the answers are the same tokens, and what the rule picks, so
the threshold can be set from figures on the machine at hand:

    python benchmarks/cascade.py [--runs 7] [--threads 2] [--base models/base]

Workloads: the rollout-step benchmark's small and large ones (random Qwen2s, every answer runs to the limit), a
middle one, and, with ``--base`` (the embedded default's model), its training rollout (128 questions x 8 answers,
<= 48 tokens) and its evaluation batch (64 x 4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(name, model, tok, questions, K: int, new_tokens: int, runs: int) -> dict:
    from nft.data.prompts import render_prompt
    from nft.rollout.kv_cache import repeated_prompt_bytes
    from nft.rollout.torch_sampler import TorchSampler

    prompts = [render_prompt(tok, q) for q in questions]
    Lp = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    samplers = {c: TorchSampler(model, tok, cascade=c) for c in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    outs = {}
    for c, s in samplers.items():  # warm-up
        outs[c] = s.sample(prompts, K, max_new_tokens=new_tokens, seed=0)
    for _ in range(runs):
        for c, s in samplers.items():
            t0 = time.perf_counter()
            s.sample(prompts, K, max_new_tokens=new_tokens, seed=0)
            times[c].append(time.perf_counter() - t0)
    picks = TorchSampler(model, tok)._use_cascade(model, len(prompts), K, Lp, torch.device("cpu"))
    cfg = model.config
    print(name, f"{statistics.median(times[False]):.3f} -> {statistics.median(times[True]):.3f} s", flush=True)
    return {
        "workload": name,
        "model": f"{cfg.hidden_size}x{cfg.num_hidden_layers}, {cfg.num_key_value_heads} kv heads",
        "P": len(prompts),
        "K": K,
        "new_tokens": new_tokens,
        "prompt_len": Lp,
        "repeated_mib": repeated_prompt_bytes(model, len(prompts), K, Lp) / 2**20,
        "off_s": times[False],
        "on_s": times[True],
        "same_tokens": bool(torch.equal(outs[False].response, outs[True].response)),
        "logprob_diff": float((outs[False].logprobs - outs[True].logprobs).abs().max()),
        "rule_picks": picks,
    }


def main() -> int:
    import json
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default=None, help="the embedded default's model folder (models/base), if built")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rollout_step import WORKLOADS, build_model

    from nft.cli import tune_malloc
    from nft.data.synthetic import SyntheticConfig, build_splits
    from nft.modeling import load_policy

    tune_malloc()
    from nft.rollout.kv_cache import CASCADE_MIN_BYTES

    questions = [p.question for p in build_splits(SyntheticConfig(train_size=2000, eval_size=30))["train"]]
    rows = []
    cases = [("small", *WORKLOADS["small"]), ("middle", 32, 8, 64, 256, 4), ("large", *WORKLOADS["large"])]
    for name, P, K, new, hidden, layers in cases:
        model, tok = build_model(None, hidden, layers)
        rows.append(measure(name, model.eval(), tok, questions[:P], K, new, args.runs))
    if args.base:
        model, tok = load_policy(args.base)
        for name, P, K in (("embedded training", 128, 8), ("embedded evaluation", 64, 4)):
            rows.append(measure(name, model.eval(), tok, questions[:P], K, 48, args.runs))

    def span(v):
        return f"{statistics.median(v):.3f} [{min(v):.3f}–{max(v):.3f}]"

    print(
        f"\n{args.threads} threads, {args.runs} runs (off and on alternated), median [min–max] seconds per call; "
        f"torch {torch.__version__}; CASCADE_MIN_BYTES = {CASCADE_MIN_BYTES / 2**20:g} MiB"
    )
    print(
        "| workload | model | P × K, new tokens | prompt re-read per layer and step | cascade off (s) | on (s) | "
        "off / on | same tokens | rule picks |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = [a / b for a, b in zip(r["off_s"], r["on_s"])]
        print(
            f"| {r['workload']} | {r['model']} | {r['P']} × {r['K']}, {r['new_tokens']} | {r['repeated_mib']:.1f} MiB | "
            f"{span(r['off_s'])} | {span(r['on_s'])} | {statistics.median(ratio):.2f}× | "
            f"{'yes' if r['same_tokens'] else 'no'} | {'cascade' if r['rule_picks'] else 'plain'} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
