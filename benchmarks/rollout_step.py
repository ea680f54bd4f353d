"""Benchmark: one rollout step (sample + grade + update) side by side with transformers' ``generate`` and (if
installed: ``pip install -e '.[bench]'``) TRL's GRPOTrainer, on two workloads, 2 CPU threads:

- small: P=16 questions x K=8 answers, up to 32 new tokens, a random Qwen2 of hidden size 128 and 4 layers;
- large: P=64 x K=8, up to 128 new tokens, hidden size 256 and 4 layers (so a ratio is not an artefact of a toy).

One optimizer step over all P x K answers (TRL: loss_type "dapo", beta 0, fp32 as ours, so no extra old-log-prob
pass; its micro-batch is the most answers whose padded rows fit the same token budget as ours and that divide P x K,
its gradient accumulation doing the rest); ours splits the step into micro-batches of at most
``--micro-batch-tokens`` tokens (default 4,096: the paper-7b preset's, the official script's
``ppo_max_token_len_per_gpu``), run as padding-free passes of like-length answers, and decodes with cascade attention
where the sampler's rule picks it (``TorchSampler``; the large workload). Each run takes the median over
``--repeats`` after a warm-up; ``--runs`` whole runs give the min-max printed in the table (markdown, for the README)
and written with the machine and versions to ``--json``.

    python benchmarks/rollout_step.py [--workloads small,large] [--runs 3] [--repeats 3] [--no-trl] [--json F]
                                      [--micro-batch-tokens 4096]

Any other process on the cores ruins the figures: check the load first.
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

THREADS = 2
#: name -> (P, K, new tokens, hidden size, layers)
WORKLOADS = {"small": (16, 8, 32, 128, 4), "large": (64, 8, 128, 256, 4)}


def build_model(path: str | None, hidden: int = 128, layers: int = 4):
    """The base model if given, else a random Qwen2 (``hidden`` x ``layers``) with the synthetic tokenizer."""
    from nft.modeling import load_policy

    if path:
        return load_policy(path)
    from nft.data.synthetic import SyntheticConfig
    from nft.modeling import ModelConfig
    from nft.pretrain import PretrainConfig, run_pretrain

    out = Path(tempfile.mkdtemp()) / "bench-model"
    # the workload model: hidden 128, 4 layers (~1.07M parameters, as the TRL measurement it compares to)
    arch = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=4, intermediate_size=4 * hidden)
    run_pretrain(
        SyntheticConfig(train_size=2000, eval_size=30),
        arch,
        PretrainConfig(steps=1, batch_size=2, warmup=1, tokenizer_corpus=1000),
        out,
        progress=False,
    )
    return load_policy(str(out))


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    fn()  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run_once(workload: str, model_path: str | None, repeats: int, with_trl: bool, micro_batch_tokens: int) -> dict:
    """One run of a workload: seconds and tokens of each side (medians over the repeats)."""
    from nft.data.prompts import render_prompt
    from nft.data.synthetic import SyntheticConfig, build_splits
    from nft.reward import GraderPool
    from nft.rollout.torch_sampler import TorchSampler
    from nft.train.config import TrainConfig
    from nft.train.engines import TorchEngine
    from nft.train.rollout import collect_rollout
    from nft.train.seeds import Cursor
    from nft.train.update import update

    P, K, NEW_TOKENS, hidden, layers = WORKLOADS[workload]
    model, tok = build_model(model_path, hidden, layers)
    n_params = sum(p.numel() for p in model.parameters())
    problems = build_splits(SyntheticConfig(train_size=2000, eval_size=30))["train"]
    prompts = [render_prompt(tok, p.question) for p in problems[:P]]
    res = {
        "workload": workload,
        "P": P,
        "K": K,
        "max_new_tokens": NEW_TOKENS,
        "model": f"Qwen2 {model.config.hidden_size}x{model.config.num_hidden_layers}",
        "params": n_params,
    }
    print(
        f"{workload}: {res['model']}, {n_params:,} parameters; P={P} K={K} <= {NEW_TOKENS} new tokens, "
        f"{THREADS} threads",
        flush=True,
    )

    # 1. transformers generate
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, attn = enc["input_ids"].repeat_interleave(K, 0), enc["attention_mask"].repeat_interleave(K, 0)

    def hf_generate():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=tok.pad_token_id,
            )
        gen = out[:, ids.shape[1] :]
        stop = torch.isin(gen, torch.tensor([tok.pad_token_id, tok.eos_token_id]))
        # tokens up to and including the first stop token
        first = torch.where(stop.any(-1), stop.float().argmax(-1) + 1, torch.full((gen.shape[0],), gen.shape[1]))
        return int(first.sum())

    t_gen, n_gen = median_time(hf_generate, repeats)
    sampler = TorchSampler(model, tok)
    res["cascade"] = model.config._attn_implementation == "sdpa" and sampler._use_cascade(
        model, P, K, ids.shape[1], torch.device("cpu")
    )
    t_ours, ro = median_time(lambda: sampler.sample(prompts, K, max_new_tokens=NEW_TOKENS, seed=0), repeats)
    n_ours = int(ro.mask.sum())
    res["generate_tokens_per_s"], res["sampler_tokens_per_s"] = n_gen / t_gen, n_ours / t_ours
    print(
        f"  cascade decoding: {'on' if res['cascade'] else 'off'}; update micro-batches of <= {micro_batch_tokens} "
        "tokens",
        flush=True,
    )
    print(
        f"  sampling   generate: {t_gen:.3f} s, {n_gen / t_gen:,.0f} tokens/s | ours: {t_ours:.3f} s, "
        f"{n_ours / t_ours:,.0f} tokens/s | speed-up {n_ours / t_ours / (n_gen / t_gen):.2f}x",
        flush=True,
    )

    # 2. our full rollout step: sample + grade + one optimizer step over all P x K answers
    cfg = TrainConfig(
        prompts_per_step=P,
        answers_per_prompt=K,
        mini_batch_prompts=P,
        micro_batch_size=P * K,
        micro_batch_tokens=micro_batch_tokens,
        max_new_tokens=NEW_TOKENS,
        lr=1e-6,
        tracking=False,
        threads=THREADS,
    )
    res["micro_batch_tokens"] = micro_batch_tokens
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

        t_step, _ = median_time(ours_step, repeats)
    med = [statistics.median(s[i] for s in splits[1:]) for i in range(5)]
    res.update(step_s=t_step, sample_s=med[0], grade_s=med[1], old_logprob_s=med[2], update_s=med[3])
    print(
        f"  ours       rollout step: {t_step:.3f} s  (sample {med[0]:.3f} / grade {med[1]:.3f} / "
        f"old-logprob {med[2]:.3f} / update {med[3]:.3f})",
        flush=True,
    )
    if with_trl:
        try:
            per_device = trl_micro_batch(P * K, ids.shape[1] + NEW_TOKENS, micro_batch_tokens)
            res["trl_micro_batch"] = per_device
            res["trl_step_s"] = trl_step(model, tok, prompts, problems[:P], repeats, P, K, NEW_TOKENS, per_device)
            print(
                f"  TRL 1.16   GRPOTrainer step ({per_device} answers per micro-batch): {res['trl_step_s']:.3f} s | "
                "ours / TRL = "
                f"{t_step / res['trl_step_s']:.2f}",
                flush=True,
            )
        except ImportError as e:
            print(f"  TRL        not installed ({e}); `pip install -e '.[bench]'` to compare")
    return res


def table(runs: list[dict]) -> str:
    """Markdown: per workload, ours, the peer, and the ratio as median [min-max] over the runs."""

    def span(vals, fmt):
        return f"{fmt(statistics.median(vals))} [{fmt(min(vals))}–{fmt(max(vals))}]"

    lines = ["| workload | measure | ours | peer | ours / peer |", "|---|---|---|---|---|"]
    for w in dict.fromkeys(r["workload"] for r in runs):
        rs = [r for r in runs if r["workload"] == w]
        r0 = rs[0]
        desc = f"{w}: {r0['model']}, P×K = {r0['P']}×{r0['K']}, ≤ {r0['max_new_tokens']} tokens"
        tps = lambda v: f"{v:,.0f}"
        sec = lambda v: f"{v:.2f}"
        lines.append(
            f"| {desc} | sampling tokens/s (peer: `generate`) | {span([r['sampler_tokens_per_s'] for r in rs], tps)} "
            f"| {span([r['generate_tokens_per_s'] for r in rs], tps)} | "
            f"{span([r['sampler_tokens_per_s'] / r['generate_tokens_per_s'] for r in rs], sec)}× |"
        )
        if all("trl_step_s" in r for r in rs):
            lines.append(
                f"| {desc} | rollout step s (peer: TRL GRPOTrainer) | {span([r['step_s'] for r in rs], sec)} | "
                f"{span([r['trl_step_s'] for r in rs], sec)} | "
                f"{span([r['step_s'] / r['trl_step_s'] for r in rs], sec)}× |"
            )
    return "\n".join(lines)


def main() -> int:
    import json
    import platform

    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="save_pretrained folder (default: a random Qwen2 per workload)")
    ap.add_argument("--workloads", default="small,large")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=4096,
        help="train.micro_batch_tokens of our update (0: one padded micro-batch of all answers)",
    )
    ap.add_argument("--json", default=None, help="write the runs, machine and versions here")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from nft.cli import tune_malloc

    # as every nft process does; it applies to the peers in this process alike (without it, each side's speed depends
    # on what ran before it in the process: glibc raises its thresholds only after a large block is freed)
    malloc = tune_malloc()
    names = [w for w in args.workloads.split(",") if w]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        ap.error(f"--workloads: unknown {bad}; expected some of {list(WORKLOADS)}")
    runs = [
        run_once(w, args.model, args.repeats, not args.no_trl, args.micro_batch_tokens)
        for _ in range(args.runs)
        for w in names
    ]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {THREADS} threads, "
        f"malloc thresholds {'tuned' if malloc else 'default'}"
    )
    print(f"\n{args.runs} runs, median [min–max]; {machine}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "versions": versions, "runs": runs}, indent=2))
    return 0


def trl_micro_batch(answers: int, row_tokens: int, micro_batch_tokens: int) -> int:
    """TRL's micro-batch (``per_device_train_batch_size``) for the same token budget as ours: the most answers whose
    padded rows (prompt + the answer limit) fit ``micro_batch_tokens`` that divide the step's answers (its gradient
    accumulation makes up the rest, still one optimizer step over one generation). 0: all answers at once."""
    if micro_batch_tokens <= 0:
        return answers
    fit = max(1, micro_batch_tokens // row_tokens)
    return max(d for d in range(1, answers + 1) if answers % d == 0 and d <= fit)


def trl_step(model, tok, prompts, problems, repeats: int, P: int, K: int, NEW_TOKENS: int, per_device: int) -> float:
    """Median seconds per GRPOTrainer step on the same workload (on-policy: one update per generation of all P x K
    answers, in micro-batches of ``per_device`` answers)."""
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
        cfg = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=per_device,
            num_generations=K,
            max_completion_length=NEW_TOKENS,
            gradient_accumulation_steps=P * K // per_device,
            beta=0.0,
            loss_type="dapo",
            learning_rate=1e-6,
            max_steps=repeats + 1,
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            temperature=1.0,
            use_cpu=True,
            seed=0,
            bf16=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        ds = Dataset.from_dict({"prompt": prompts * (repeats + 2)})
        trainer = GRPOTrainer(
            model=copy.deepcopy(model),
            reward_funcs=reward,
            args=cfg,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[Timer()],
        )
        trainer.train()
    return statistics.median(times[1:])


if __name__ == "__main__":
    sys.exit(main())
