"""Benchmark: host memory of the trainer's log-prob pass at a paper-scale vocabulary.

One forward and backward pass of ``nft.modeling.response_logprobs`` (log-probs and entropy, as the update runs it)
over 4,096 answer tokens (8 prompts x 4 answers x 128 tokens, prompts of 64 tokens) of a thin random Qwen2 with
Qwen2.5's vocabulary (151,936) and Qwen2.5-0.5B's width (896, one layer, tied embeddings; ``--untied``: a head of its
own, as Qwen2.5-7B has), in fp32 and in bf16 weights (the DeepSpeed presets' dtype; the logits are fp32 in both), in
one pass (``train.logprob_chunk_mb: 0``) and chunked (128 MB, the default, and 64). Each runs in a fresh process; a
sampler thread reads the process's resident memory every 2 ms, and the figure is the peak during the pass over the
resident memory before it (a one-row pass has already made the weights' gradient buffers). The fp32 logits of the
pass, [4096, 151936], are 2.49 GB. Whatever the chunking, backward makes the head's weight gradient (0.545 GB in fp32,
0.27 GB in bf16) before adding it to the weight's, and a tied embedding's backward makes a second one.

    python benchmarks/memory.py [--chunk-mb 0,128,64] [--dtypes float32,bfloat16] [--untied] [--tokens 128] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
VOCAB, WIDTH, PROMPTS, K, PROMPT_LEN = 151936, 896, 8, 4, 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """The largest resident memory seen by a thread sampling every ``every`` seconds while in the block."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every)

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def one_pass(chunk_mb: float, tokens: int, dtype: str, tied: bool) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nft.cli import tune_malloc
    from nft.modeling import response_logprobs

    tune_malloc()  # the allocator settings `nft train` runs with
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=4864,
        num_hidden_layers=1,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]
    prompt_ids = [p for p in prompts for _ in range(K)]
    response = torch.randint(0, VOCAB, (PROMPTS * K, tokens), generator=g)
    mask = torch.ones(PROMPTS * K, tokens)
    # a one-row pass first: the weights' gradient buffers exist before the measured pass (model state, not the pass)
    lp, _ = response_logprobs(model, prompt_ids[:1], response[:1, :4], mask[:1, :4], 0, 1.0, True, True, chunk_mb=0)
    lp.sum().backward()
    before = rss_bytes()
    t0 = time.perf_counter()
    with Peak() as peak:
        lp, ent = response_logprobs(model, prompt_ids, response, mask, 0, 1.0, True, True, chunk_mb=chunk_mb)
        (lp * mask).sum().backward()
    return {
        "dtype": dtype,
        "tied": tied,
        "chunk_mb": chunk_mb,
        "tokens": int(mask.sum()),
        "peak_over_before_gb": round((peak.peak - before) / 1e9, 3),
        "logits_fp32_gb": round(int(mask.sum()) * VOCAB * 4 / 1e9, 3),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-mb", default="0,128,64")
    ap.add_argument("--tokens", type=int, default=128, help="answer tokens per row (32 rows)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="the model's dtypes (the logits are fp32 in both)")
    ap.add_argument("--untied", action="store_true", help="a head of its own (Qwen2.5-7B's), not the embedding's")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)  # a child: one pass
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_pass(args.one, args.tokens, args.dtype, not args.untied)))
        return
    rows = []
    for dtype, mb in ((d, float(x)) for d in args.dtypes.split(",") for x in args.chunk_mb.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(mb), "--tokens", str(args.tokens), "--dtype", dtype]
            + ["--untied"] * args.untied,
            capture_output=True,
            text=True,
            check=True,
            # the processor's own bf16 kernels (nft pins AVX2 for bit-equal weights across machines; there, bf16
            # matmuls are emulated, 50x slower); the memory figures do not depend on it
            env={**os.environ, "NFT_CPU_ISA": os.environ.get("NFT_CPU_ISA", "native")},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"log-prob pass, {rows[0]['tokens']} tokens x vocabulary {VOCAB} (fp32 logits {rows[0]['logits_fp32_gb']} GB)"
    )
    print(f"{'weights':>9} {'chunk_mb':>9} {'peak over before (GB)':>22} {'of the logits':>14} {'seconds':>8}")
    for r in rows:
        frac = r["peak_over_before_gb"] / r["logits_fp32_gb"]
        print(
            f"{r['dtype']:>9} {r['chunk_mb']:>9g} {r['peak_over_before_gb']:>22.3f} {frac:>14.2f} {r['seconds']:>8.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows}))


if __name__ == "__main__":
    main()
