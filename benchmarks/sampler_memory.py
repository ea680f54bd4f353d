"""Benchmark: the torch sampler's host memory per call, one block against a memory budget (``sample_memory_mb``).

    python benchmarks/sampler_memory.py [--prompts 32,128,512] [--budgets 0,256] [--json F]

A random 2-layer Qwen2 with Qwen2.5's vocabulary (151,936; ``scripts/gpu_smoke.py``'s TINY shape) samples K = 4
answers of up to ``--new`` tokens to P prompts of about 300 tokens (the paper preset's prompt length), in one
process; each call's peak resident memory over the memory before it is the kernel's high-water mark
(``/proc/self/clear_refs`` reset, then ``VmHWM``). One block holds every answer's KV cache and its vocabulary-sized
step temporaries at once, so it grows with P; within a budget the prompts go in chunks and the peak stays near the
budget. The chunked calls' tokens are compared with the one-block call's under the budget's per-answer streams.
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
    ap.add_argument("--prompts", default="32,128,512")
    ap.add_argument("--budgets", default="0,256,4096", help="sample_memory_mb values (0: one block)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new", type=int, default=32, help="new tokens per answer (a random model never stops)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch
    from memory_ranks import Phase
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(REPO / "scripts"))
    from gpu_smoke import TINY

    from nft.data.tokenizer import SPECIAL_TOKENS, train_bpe
    from nft.rollout.torch_sampler import TorchSampler

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=False)).eval()
    bpe = train_bpe(["What is 12 + 7? Let us add the numbers step by step."] * 4, 300)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    assert all(t in bpe.get_vocab() for t in SPECIAL_TOKENS)
    rows = []
    for p in [int(x) for x in args.prompts.split(",")]:
        # ~300 tokens per prompt, lengths differing a little (left padding)
        prompts = [" ".join(["What is 12 + 7?"] * (60 + i % 7)) for i in range(p)]
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
                row["same_tokens_as_first_budget"] = bool(torch.equal(ro.response, ref.response))
            rows.append(row)
            print(
                f"P {p:5d} x K {args.k} ({p * args.k} answers, {args.new} tokens): "
                f"{'one block' if not mb else f'budget {mb:g} MB'}: peak over before {ph.over / GB:.2f} GB, "
                f"{row['seconds']:.1f} s",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
