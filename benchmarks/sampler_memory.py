"""Benchmark: the torch sampler's host memory per call, one block against a memory budget (``sample_memory_mb``).

    python benchmarks/sampler_memory.py [--model models/base] [--data data] [--prompts 32,128,512,1536]
                                        [--budgets 0,256,1024] [--json F]

The embedded study's base model (``make study`` builds ``models/base`` and ``data``) samples K = 4 answers of up to
3,584 new tokens (the 7B preset's ``max_new_tokens``) to P training questions, in one process, as the 7B preset with
the tiny model swapped in would. Each call's peak resident memory over the memory before it is the kernel's
high-water mark (``/proc/self/clear_refs`` reset, then ``VmHWM``). One block preallocates every answer's KV cache for
the longest answer, so it grows with P; within a budget the prompts go in chunks and the peak stays near the budget.
The budgets' answers are compared with each other (the same tokens, whatever the chunks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
GB = 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "base"))
    ap.add_argument("--data", default=str(REPO / "data"))
    ap.add_argument("--prompts", default="32,128,512,1536")
    ap.add_argument("--budgets", default="0,256,1024", help="sample_memory_mb values (0: one block)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new", type=int, default=3584, help="max new tokens per answer")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    from memory_ranks import Phase

    from nft.data.benchmarks import load_benchmark
    from nft.data.prompts import render_prompt
    from nft.modeling import load_policy
    from nft.rollout.torch_sampler import TorchSampler

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, tok = load_policy(args.model)
    questions = [p.question for p in load_benchmark("train", args.data)]
    rows = []
    for p in [int(x) for x in args.prompts.split(",")]:
        prompts = [render_prompt(tok, questions[i % len(questions)]) for i in range(p)]
        ref = None
        for mb in [float(b) for b in args.budgets.split(",")]:
            sampler = TorchSampler(model, tok, memory_mb=mb)
            t0 = time.perf_counter()
            with Phase() as ph:
                ro = sampler.sample(prompts, args.k, max_new_tokens=args.new, seed=3)
            row = {"prompts": p, "answers": p * args.k, "budget_mb": mb, "over_gb": ph.over / GB}
            row["seconds"] = time.perf_counter() - t0
            if mb:
                ref = ref or ro
                row["same_tokens_as_first_budget"] = ro.texts == ref.texts
            rows.append(row)
            print(
                f"P {p:5d} x K {args.k} ({p * args.k} answers, {args.new} tokens): "
                f"{'one block' if not mb else f'budget {mb:g} MB'}: peak over before {ph.over / GB:.2f} GB, "
                f"{row['seconds']:.1f} s"
                + (
                    f"; same answers as budget {args.budgets.split(',')[1]}: {row['same_tokens_as_first_budget']}"
                    if mb
                    else ""
                ),
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
