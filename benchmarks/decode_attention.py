"""Benchmark: one decoding step's attention over a preallocated cache, per way of serving grouped query heads.

Times ``nft.rollout.kv_cache._decode_sdpa`` for each mode of ``DECODE_GQA`` ("gqa": SDPA's ``enable_gqa``;
"fold": the G query heads of a key/value head as G query positions; "repeat": each key/value head copied G times,
as transformers' ``sdpa`` does with a mask) on views of a cache buffer with an additive key mask, and the sampler's
old way (keys concatenated to a contiguous tensor each step, then repeated) for reference. Shapes default to
Qwen2.5-0.5B's (14 query heads, 2 key/value heads, head size 64) at 512 rows and 300 cached positions.

    python benchmarks/decode_attention.py [--rows 512] [--context 300] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--capacity", type=int, default=640)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    from nft.rollout import kv_cache

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    B, H, Hk, D, L, cap = args.rows, args.heads, args.kv_heads, args.head_dim, args.context, args.capacity
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, 1, H, D, device=dev, dtype=dtype, generator=g).transpose(1, 2)  # as the model makes it
    kbuf = torch.randn(B, Hk, cap, D, device=dev, dtype=dtype, generator=g)
    vbuf = torch.randn(B, Hk, cap, D, device=dev, dtype=dtype, generator=g)
    keep = torch.ones(B, cap, dtype=torch.bool, device=dev)
    keep[:, : L // 10] = False  # left padding
    bias = torch.zeros(B, 1, 1, cap, device=dev, dtype=dtype).masked_fill_(~keep[:, None, None], torch.finfo(dtype).min)
    k, v, m = kbuf[:, :, :L], vbuf[:, :, :L], bias[..., :L]
    module = type("M", (), {})()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        sync()
        return (time.perf_counter() - t0) / args.repeats * 1e3

    print(
        f"device {dev} ({torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}), {dtype}, torch "
        f"{torch.__version__}; rows {B}, heads {H}/{Hk}, head size {D}, context {L} of capacity {cap}"
    )
    ref = None
    for mode in ("gqa", "fold", "repeat"):  # ("transformers": the model's own attention, not timed here)
        kv_cache.DECODE_GQA[dev.type] = mode
        out = kv_cache._decode_sdpa(module, q, k, v, m)[0]
        ref = out if ref is None else ref
        err = (out.float() - ref.float()).abs().max().item()
        print(
            f"{mode:>7}: {timed(lambda: kv_cache._decode_sdpa(module, q, k, v, m)):8.3f} ms  (max diff to gqa {err:.1e})"
        )
    kc, vc = k.contiguous(), v.contiguous()
    new = torch.randn(B, Hk, 1, D, device=dev, dtype=dtype, generator=g)

    def old_way():  # DynamicCache: concatenate, then transformers' sdpa repeats the heads under a boolean mask
        kk, vv = torch.cat([kc, new], 2), torch.cat([vc, new], 2)
        kk, vv = kk.repeat_interleave(H // Hk, 1), vv.repeat_interleave(H // Hk, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=keep[:, None, None, : L + 1])

    print(f"    old: {timed(old_way):8.3f} ms  (concatenate + repeat + boolean mask)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
