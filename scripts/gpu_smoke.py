"""Smoke test of the scale-out path on a GPU machine (no hub, no network).

Builds a random model with Qwen2.5-0.5B's configuration and a local tokenizer, runs 2 rollout steps of the online
loop with the DeepSpeed engine (ZeRO-3, bf16) and the vLLM sampler -- each where installed, else the torch engine /
the transformers sampler -- and prints the throughput of sampling and training (step 2; step 1 warms up).

A random model answers nothing right, so every reward is 0 and the update's gradient is 0: the figures are the
speed of the same forward, backward and optimizer work, not of learning. ``--tiny`` swaps in a 2-layer model for a
dry run on a CPU.

``--bench`` first measures, outside the loop and on the bf16 model: the torch sampler against transformers'
``generate`` (same prompts, P x K answers, up to ``--bench-tokens`` new tokens; tokens counted up to each row's first
stop token), then the trainer's forward + backward over the sampled answers (micro-batches of ``--bench-micro``
rows, the shared-prefix pass) with its model FLOPs utilisation: 6 x parameters (the tied lm_head's matmul counted
once, the embedding lookup not) plus the attention term 12 x layers x hidden x context, per processed token,
over the bf16 dense peak of the GPU (H100 SXM: 989 TFLOP/s).

Usage: scripts/gpu_smoke.sh [--out DIR] [--prompts 32] [--answers 8] [--max-new-tokens 256] [--engine E]
       [--sampler S] [--tiny] [--bench] [--bench-prompts 64] [--bench-answers 8] [--bench-tokens 512]
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
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = dict(
    QWEN25_05B,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=2048,
)


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
    config = Qwen2Config(
        **arch,
        bos_token_id=None,
        eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]],
        pad_token_id=special["<|endoftext|>"],
        use_sliding_window=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"smoke: random model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {model_dir}")
    return data, model_dir


#: bf16 dense tensor-core peak (TFLOP/s) by device name, for the MFU figure
PEAK_BF16 = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(
    model_dir: Path, P: int, K: int, new_tokens: int, micro: int, modes: list[str] | None = None, train: bool = True
) -> dict:
    """Sampler vs ``generate`` tokens/s, then trainer tokens/s and MFU, on the bf16 model (see the module doc)."""
    from nft.data.prompts import render_prompt
    from nft.data.synthetic import SyntheticConfig, build_splits
    from nft.modeling import load_policy, response_logprobs, stop_token_ids
    from nft.rollout.torch_sampler import TorchSampler

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    model, tok = load_policy(str(model_dir), dtype=torch.bfloat16 if gpu else torch.float32)
    model.to(dev)
    problems = build_splits(SyntheticConfig(train_size=2000, eval_size=32))["train"][:P]
    prompts = [render_prompt(tok, p.question) for p in problems]
    stops = torch.tensor(stop_token_ids(tok), device=dev)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, attn = enc["input_ids"].repeat_interleave(K, 0).to(dev), enc["attention_mask"].repeat_interleave(K, 0).to(dev)
    out: dict = {
        "workload": {
            "P": P,
            "K": K,
            "max_new_tokens": new_tokens,
            "dtype": str(model.dtype),
            "params": sum(p.numel() for p in model.parameters()),
        }
    }

    def hf_generate(n_new: int) -> int:
        with torch.inference_mode():
            g = model.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n_new,
                pad_token_id=tok.pad_token_id,
            )
        gen = g[:, ids.shape[1] :]
        stop = torch.isin(gen, stops)
        first = torch.where(stop.any(-1), stop.float().argmax(-1) + 1, torch.full_like(gen[:, 0], gen.shape[1]))
        return int(first.sum())

    from nft.rollout import kv_cache

    sampler = TorchSampler(model, tok)

    def ours(mode):
        def run(n):
            if mode:
                kv_cache.DECODE_GQA[model.device.type] = mode
            return int(sampler.sample(prompts, K, max_new_tokens=n, seed=0).mask.sum())

        return run

    default = kv_cache.DECODE_GQA.get(torch.device(dev).type)
    for name, fn in (
        ("generate", lambda n: hf_generate(n)),
        ("ours", ours(None)),
        *((f"ours_{m}", ours(m)) for m in (modes or []) if m != default),
    ):
        fn(16)  # warm-up (kernels, allocator)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        _sync()
        t0 = time.perf_counter()
        n = fn(new_tokens)
        _sync()
        dt = time.perf_counter() - t0
        out[f"sample_{name}"] = {
            "seconds": dt,
            "tokens": n,
            "tokens_per_s": n / dt,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        }
        print(f"bench: sampling {name}: {n:,} tokens in {dt:.2f} s = {n / dt:,.0f} tokens/s", flush=True)
    out["sampler_speedup"] = out["sample_ours"]["tokens_per_s"] / out["sample_generate"]["tokens_per_s"]
    out["decode_gqa"] = default
    print(f"bench: sampler ({default} attention) / generate = {out['sampler_speedup']:.2f}x", flush=True)
    if default:
        kv_cache.DECODE_GQA[torch.device(dev).type] = default
    if not train:
        return out

    ro = sampler.sample(prompts, K, max_new_tokens=new_tokens, seed=1)
    cfg = model.config
    n_params = out["workload"]["params"]
    model.train()
    if gpu:
        torch.cuda.reset_peak_memory_stats()

    def fwd_bwd(rows: range) -> tuple[int, int, float]:
        sl = slice(rows.start, rows.stop)
        logp, _ = response_logprobs(model, ro.prompt_ids[sl], ro.response[sl], ro.mask[sl], tok.pad_token_id)
        mask = ro.mask[sl].to(logp.device)
        (-(logp * mask).sum() / 1000).backward()
        T = ro.response.shape[1]
        uniq = {tuple(p) for p in ro.prompt_ids[sl]}
        Lp = max(len(p) for p in uniq)
        processed = len(rows) * T + len(uniq) * Lp  # answer rows padded to T; each distinct prompt once
        ctx = Lp + T / 2  # mean attention context of an answer token
        flops = 6 * n_params * processed + 12 * cfg.num_hidden_layers * cfg.hidden_size * ctx * len(rows) * T
        return processed, int(mask.sum()), flops

    fwd_bwd(range(0, micro))  # warm-up
    model.zero_grad(set_to_none=True)
    _sync()
    t0 = time.perf_counter()
    tot = [0, 0, 0.0]
    for i in range(0, len(ro), micro):
        for j, v in enumerate(fwd_bwd(range(i, min(i + micro, len(ro))))):
            tot[j] += v
    _sync()
    dt = time.perf_counter() - t0
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    out["train"] = {
        "seconds": dt,
        "micro_batch_rows": micro,
        "processed_tokens": tot[0],
        "answer_tokens": tot[1],
        "processed_tokens_per_s": tot[0] / dt,
        "answer_tokens_per_s": tot[1] / dt,
        "tflops": tot[2] / dt / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": tot[2] / dt / 1e12 / peak if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
    }
    t = out["train"]
    print(
        f"bench: train fwd+bwd: {t['processed_tokens']:,} tokens ({t['answer_tokens']:,} answer) in {dt:.2f} s = "
        f"{t['processed_tokens_per_s']:,.0f} tokens/s, {t['tflops']:.1f} TFLOP/s"
        + (f", MFU {t['mfu']:.1%}" if t["mfu"] else "")
        + (f", peak {t['peak_gib']:.1f} GiB" if gpu else ""),
        flush=True,
    )
    model = sampler = ro = None  # free the device before the DeepSpeed part
    if gpu:
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="smoke-out")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--answers", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU dry run)")
    ap.add_argument(
        "--engine", choices=["auto", "deepspeed", "torch"], default="auto", help="auto: deepspeed where installed"
    )
    ap.add_argument("--sampler", choices=["auto", "vllm", "torch"], default="auto", help="auto: vllm where installed")
    ap.add_argument("--bench", action="store_true", help="sampler vs generate and trainer MFU first")
    ap.add_argument("--bench-only", action="store_true", help="the bench alone (no training run)")
    ap.add_argument("--bench-prompts", type=int, default=64)
    ap.add_argument("--bench-answers", type=int, default=8)
    ap.add_argument("--bench-tokens", type=int, default=512)
    ap.add_argument("--bench-micro", type=int, default=16)
    ap.add_argument("--bench-modes", default="", help="also sample with these DECODE_GQA modes (fold,gqa,repeat)")
    ap.add_argument("--bench-no-train", action="store_true", help="the sampling part of the bench alone")
    args = ap.parse_args()
    from nft.train.config import TrainConfig
    from nft.train.run import run_training

    out = Path(args.out)
    gpu = torch.cuda.is_available()
    print(f"smoke: torch {torch.__version__}, device: {torch.cuda.get_device_name(0) if gpu else 'CPU'}")
    if (out / "model" / "config.json").is_file():
        data, model_dir = out / "data", out / "model"  # built by an earlier run
    else:
        data, model_dir = build(out, TINY if args.tiny else QWEN25_05B)
    if args.bench or args.bench_only:
        res = bench(
            model_dir,
            args.bench_prompts,
            args.bench_answers,
            args.bench_tokens,
            args.bench_micro,
            [m for m in args.bench_modes.split(",") if m],
            not args.bench_no_train,
        )
        res["device"] = torch.cuda.get_device_name(0) if gpu else "cpu"
        res["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
        (out / "bench.json").write_text(json.dumps(res, indent=2))
        if args.bench_only:
            return 0
    has_ds = importlib.util.find_spec("deepspeed") is not None if args.engine == "auto" else args.engine == "deepspeed"
    has_vllm = importlib.util.find_spec("vllm") is not None if args.sampler == "auto" else args.sampler == "vllm"
    repo = Path(__file__).resolve().parents[1]
    cfg = TrainConfig(
        model=str(model_dir),
        data=str(data),
        steps=2,
        prompts_per_step=args.prompts,
        answers_per_prompt=args.answers,
        mini_batch_prompts=max(args.prompts // 2, 1),
        micro_batch_size=32,
        max_new_tokens=args.max_new_tokens,
        batch_rule="all",
        lr=1e-6,
        val_every=0,
        val_benchmarks=["synth-easy"],
        val_k=1,
        val_limit=16,
        checkpoint_every=100,
        threads=4,
        grader="dapo",
        grader_workers=4,
        tracking=False,
        engine="deepspeed" if has_ds else "torch",
        deepspeed_config=str(repo / "experiments/deepspeed/zero3.json") if has_ds else "",
        sampler="vllm" if has_vllm else "torch",
        vllm={"gpu_memory_utilization": 0.35, "sleep": gpu, "max_model_len": 1024},
    )
    missing = [
        n
        for n, want in (("deepspeed", args.engine), ("vllm", args.sampler))
        if want == "auto" and importlib.util.find_spec(n) is None
    ]
    print(
        f"smoke: engine {cfg.engine}{' (ZeRO-3)' if has_ds else ''}, sampler {cfg.sampler} "
        f"(not installed: {missing or 'none'}), "
        f"{args.prompts} prompts x {args.answers} answers x <= {args.max_new_tokens} tokens"
    )
    t0 = time.perf_counter()
    run_dir = out / f"run-{cfg.engine}-{cfg.sampler}"
    run_training(cfg, "grpo", 0, run_dir, progress=False)
    rows = [json.loads(ln) for ln in (run_dir / "history.jsonl").read_text().splitlines()]
    keys = [
        "time/step",
        "time/sample",
        "time/grade",
        "time/old_logprob",
        "time/update",
        "time/weight_push",
        "perf/sample_tokens_per_s",
        "perf/train_tokens_per_s",
        "train/tokens",
        "response/length_mean",
    ]
    summary = {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "engine": cfg.engine,
        "sampler": cfg.sampler,
        "total_s": time.perf_counter() - t0,
        "steps": [{k: r.get(k) for k in ["step", *keys]} for r in rows if r["step"] > 0],
    }
    if gpu:
        summary["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for s in summary["steps"]:
        print(
            "smoke: step {step}: {time/step:.2f} s (sample {time/sample:.2f}, update {time/update:.2f}, push "
            "{time/weight_push:.2f}); sampling {perf/sample_tokens_per_s:,.0f} tokens/s, training "
            "{perf/train_tokens_per_s:,.0f} tokens/s".format(**s)
        )
    if gpu:
        print(f"smoke: peak GPU memory {summary['max_memory_allocated_gib']:.1f} GiB")
    (out / f"summary-{cfg.engine}-{cfg.sampler}.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
