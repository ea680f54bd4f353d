"""Benchmark: the ZeRO-3 weight push (gathering the full weights for the sampler) by bucket size, under a launcher.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/weight_push.py [--shape tiny|qwen0.5b] [--buckets 0,16,256]

A random Qwen2 (``tiny``: the embedded default's shape; ``qwen0.5b``: Qwen2.5-0.5B's, 494M parameters) is wrapped
by the DeepSpeed engine with experiments/deepspeed/zero3.json; rank 0 prints the seconds of
a walk through ``DeepSpeedEngine.iter_weights`` (the push's gather, without a sampler to copy into) per
``train.push_bucket_mb`` (0: one parameter at a time), median of ``--repeats`` after a warm-up, and checks that every
bucket size gathers the same tensors (by digest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "qwen0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--buckets", default="0,16,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = ap.parse_args()
    from dataclasses import replace

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nft.train.config import TrainConfig
    from nft.train.ds_config import resolve_deepspeed_config
    from nft.train.engines import DeepSpeedEngine, init_distributed

    torch.set_num_threads(1)
    dist = init_distributed("deepspeed")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[args.shape], tie_word_embeddings=True, use_sliding_window=False))
    n = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        prompts_per_step=2,
        answers_per_prompt=2,
        mini_batch_prompts=2,
        micro_batch_size=2,
        tracking=False,
        threads=1,
        engine="deepspeed",
        deepspeed_config=str(ROOT / "experiments/deepspeed/zero3.json"),
    )
    engine = DeepSpeedEngine(model, cfg, resolve_deepspeed_config(cfg.deepspeed_config, cfg, dist.world))
    ref = None
    for mb in [float(b) for b in args.buckets.split(",")]:
        engine.cfg = replace(cfg, push_bucket_mb=mb)
        times = []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            for _pair in engine.iter_weights():
                pass
            times.append(time.perf_counter() - t0)
        times = times[1:]
        # the same tensors for every bucket size: compared by an exact per-tensor digest, not a kept copy
        digest = {
            k: (tuple(v.shape), float(v.double().sum()), float(v.double().abs().max()))
            for k, v in engine.iter_weights()
        }
        same = ref is None or digest == ref
        ref = ref or digest
        if dist.is_main:
            print(
                f"push {args.shape} ({n / 1e6:.1f}M parameters, {dist.world} ranks, ZeRO-3): bucket {mb:g} MB: "
                f"{statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}); "
                f"{'same tensors' if same else 'DIFFERENT tensors'}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
