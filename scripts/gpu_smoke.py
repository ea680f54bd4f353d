"""Smoke test of the scale-out path on a GPU machine (no hub, no network).

Builds a random model with Qwen2.5-0.5B's configuration and a local tokenizer, runs 2 rollout steps of the online
loop with the DeepSpeed engine (ZeRO-3, bf16) and the vLLM sampler -- each where installed, else the torch engine /
the transformers sampler -- and prints the throughput of sampling and training (step 2; step 1 warms up).

A random model answers nothing right, so every reward is 0 and the update's gradient is 0: the figures are the
speed of the same forward, backward and optimizer work, not of learning. ``--tiny`` swaps in a 2-layer model for a
dry run on a CPU.

Usage: scripts/gpu_smoke.sh [--out DIR] [--prompts 32] [--answers 8] [--max-new-tokens 256] [--engine E]
       [--sampler S] [--tiny]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Qwen/Qwen2.5-0.5B's config.json (architecture fields)
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048)


def build(out: Path, arch: dict) -> tuple[Path, Path]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nft.data.synthetic import SyntheticConfig, build_splits, data_hash, write_jsonl
    from nft.data.tokenizer import SPECIAL_TOKENS, save_as_qwen2, train_bpe
    from nft.pretrain import END_OF_TURN, prompt_text

    data, model_dir = out / "data", out / "model"
    splits = build_splits(SyntheticConfig(train_size=2000, eval_size=32))
    data.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, items in splits.items():
        write_jsonl(data / f"{name}.jsonl", items)
        manifest[name] = {"count": len(items), "hash": data_hash(items)}
    (data / "manifest.json").write_text(json.dumps(manifest))
    bpe = train_bpe([prompt_text(p.question) + p.solution + END_OF_TURN for p in splits["train"][:500]], 512)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_as_qwen2(bpe, model_dir)
    special = {t: bpe.token_to_id(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(**arch, bos_token_id=None, eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]],
                         pad_token_id=special["<|endoftext|>"], use_sliding_window=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"smoke: random model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {model_dir}")
    return data, model_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="smoke-out")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--answers", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU dry run)")
    ap.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default="auto",
                    help="auto: deepspeed where installed")
    ap.add_argument("--sampler", choices=["auto", "vllm", "torch"], default="auto", help="auto: vllm where installed")
    args = ap.parse_args()
    from nft.train.config import TrainConfig
    from nft.train.loop import run_training

    out = Path(args.out)
    gpu = torch.cuda.is_available()
    print(f"smoke: torch {torch.__version__}, device: {torch.cuda.get_device_name(0) if gpu else 'CPU'}")
    if (out / "model" / "config.json").is_file():
        data, model_dir = out / "data", out / "model"  # built by an earlier run
    else:
        data, model_dir = build(out, TINY if args.tiny else QWEN25_05B)
    has_ds = importlib.util.find_spec("deepspeed") is not None if args.engine == "auto" else args.engine == "deepspeed"
    has_vllm = importlib.util.find_spec("vllm") is not None if args.sampler == "auto" else args.sampler == "vllm"
    repo = Path(__file__).resolve().parents[1]
    cfg = TrainConfig(
        model=str(model_dir), data=str(data), steps=2, prompts_per_step=args.prompts, answers_per_prompt=args.answers,
        mini_batch_prompts=max(args.prompts // 2, 1), micro_batch_size=32, max_new_tokens=args.max_new_tokens,
        batch_rule="all", lr=1e-6, val_every=0, val_benchmarks=["synth-easy"], val_k=1, val_limit=16,
        checkpoint_every=100, threads=4, grader="dapo", grader_workers=4, tracking=False,
        engine="deepspeed" if has_ds else "torch",
        deepspeed_config=str(repo / "experiments/deepspeed/zero3.json") if has_ds else "",
        sampler="vllm" if has_vllm else "torch",
        vllm={"gpu_memory_utilization": 0.35, "sleep": gpu, "max_model_len": 1024},
    )
    missing = [n for n, want in (("deepspeed", args.engine), ("vllm", args.sampler))
               if want == "auto" and importlib.util.find_spec(n) is None]
    print(f"smoke: engine {cfg.engine}{' (ZeRO-3)' if has_ds else ''}, sampler {cfg.sampler} "
          f"(not installed: {missing or 'none'}), "
          f"{args.prompts} prompts x {args.answers} answers x <= {args.max_new_tokens} tokens")
    t0 = time.perf_counter()
    run_dir = out / f"run-{cfg.engine}-{cfg.sampler}"
    run_training(cfg, "grpo", 0, run_dir, progress=False)
    rows = [json.loads(ln) for ln in (run_dir / "history.jsonl").read_text().splitlines()]
    keys = ["time/step", "time/sample", "time/grade", "time/old_logprob", "time/update", "time/weight_push",
            "perf/sample_tokens_per_s", "perf/train_tokens_per_s", "train/tokens", "response/length_mean"]
    summary = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "engine": cfg.engine,
               "sampler": cfg.sampler, "total_s": time.perf_counter() - t0,
               "steps": [{k: r.get(k) for k in ["step", *keys]} for r in rows if r["step"] > 0]}
    if gpu:
        summary["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for s in summary["steps"]:
        print("smoke: step {step}: {time/step:.2f} s (sample {time/sample:.2f}, update {time/update:.2f}, push "
              "{time/weight_push:.2f}); sampling {perf/sample_tokens_per_s:,.0f} tokens/s, training "
              "{perf/train_tokens_per_s:,.0f} tokens/s".format(**s))
    if gpu:
        print(f"smoke: peak GPU memory {summary['max_memory_allocated_gib']:.1f} GiB")
    (out / f"summary-{cfg.engine}-{cfg.sampler}.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
