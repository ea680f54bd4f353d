"""Evaluation: avg@k, unbiased pass@k and maj@k; one code path for in-loop validation and the final evaluation.

Usage: ``nft evaluate --model DIR --benchmarks synth-medium,math500 --k 4 --out FILE.json [--samples FILE.jsonl]``

Definitions (per benchmark, over its problems):
- ``avg@k``: mean accuracy over the k sampled answers of each problem, averaged over problems (the paper's "avg@32");
- ``pass@k``: the unbiased estimator of Chen et al. (2021), 1 - C(n - c, k) / C(n, k) with n = k samples here;
- ``maj@k``: the most frequent (normalised) final answer among the k is correct (ties: the earliest);
- ``stderr``: the standard error of the per-problem accuracy across problems.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import cpu_isa
from .data.prompts import render_prompt
from .reward import GraderPool, extract_boxed, normalize_dapo


@dataclass
class EvalConfig:
    """Evaluation settings (the ``eval`` section of params.yaml)."""

    benchmarks: list[str] = field(default_factory=lambda: ["synth-easy", "synth-medium", "synth-hard"])
    """benchmark names from the registry (``nft.data.benchmarks``)."""
    k: int = 4
    """samples per problem."""
    k_per_benchmark: dict[str, int] = field(default_factory=dict)
    """k for particular benchmarks (the paper: avg@32 on AIME24/AIME25/AMC23, avg@1 elsewhere)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    limit: int = 0
    """evaluate only the first ``limit`` problems of each benchmark (0: all)."""
    prompts_per_batch: int = 64
    sample_memory_mb: float = 0.0
    """the torch sampler's decoding memory per call (as ``train.sample_memory_mb``; 0: one block)."""
    stop_tokens: Literal["chat", "eos"] = "chat"
    """where a sampled answer ends (as ``train.stop_tokens``)."""
    seed: int = 0
    graders: list[str] = field(default_factory=lambda: ["math_verify", "dapo"])
    """the first grader gives the headline metrics; the others are reported beside it with the disagreement rate."""
    grader_per_set: dict[str, str] = field(default_factory=dict)
    """the headline grader of particular benchmarks (as ``train.grader_per_set``; the paper presets: the official
    code's grader of each set); the others of ``graders`` are reported beside it."""
    grade_truncated: bool = False
    """grade an answer cut at the length limit like the others (the official code); False: it is wrong."""
    workers: int = 2
    """grader worker processes."""
    threads: int = 1
    """torch CPU threads (one thread: bit-identical results from run to run; ``make study`` runs two stages at once,
    one thread each)."""
    sampler: Literal["torch", "vllm"] = "torch"
    """sampling backend (``vllm``: one offline engine; see ``nft.rollout.vllm_sampler``)."""
    vllm: dict[str, Any] = field(default_factory=dict)
    """vLLM engine options (as ``train.vllm``)."""

    def __post_init__(self):
        if self.k < 1 or any(v < 1 for v in self.k_per_benchmark.values()):
            raise ValueError(f"eval.k / eval.k_per_benchmark: must be >= 1, got {self.k}, {self.k_per_benchmark}")
        if self.threads < 1:
            raise ValueError(f"eval.threads: must be >= 1, got {self.threads}")
        if self.sample_memory_mb < 0:
            raise ValueError(f"eval.sample_memory_mb: expected >= 0 (0: one block), got {self.sample_memory_mb}")
        if not self.graders:
            raise ValueError("eval.graders: at least one grader is needed")
        from .reward import GRADERS

        bad = [g for g in self.graders if g not in GRADERS]
        if bad:
            raise ValueError(f"eval.graders: unknown grader(s) {bad}; known: {sorted(GRADERS)}")
        for name, g in self.grader_per_set.items():
            if g not in GRADERS:
                raise ValueError(f"eval.grader_per_set.{name}: unknown grader {g!r}; known: {sorted(GRADERS)}")

    def graders_of(self, benchmark: str) -> list[str]:
        """``benchmark``'s graders, its headline grader first."""
        head = self.grader_per_set.get(benchmark, self.graders[0])
        return [head, *[g for g in self.graders if g != head]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@k: k ({k}) > n ({n})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@k: the most frequent normalised final answer is correct (None answers never win; ties: earliest)."""
    keys = [normalize_dapo(a) if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return False
    best = max(counts.values())
    for key, ok in zip(keys, correct):
        if key is not None and counts[key] == best:
            return ok
    return False


def summarize(
    correct: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, answers: list[list[str | None]], k: int
) -> dict[str, float]:
    """Metrics of one benchmark from ``[problems, k]`` arrays."""
    per_problem = correct.mean(axis=1)
    n = len(per_problem)
    return {
        f"avg@{k}": float(per_problem.mean()) if n else float("nan"),
        f"pass@{k}": float(np.mean([pass_at_k(k, int(c), k) for c in correct.sum(axis=1)])) if n else float("nan"),
        f"maj@{k}": float(np.mean([majority_correct(a, list(c)) for a, c in zip(answers, correct)]))
        if n
        else float("nan"),
        "stderr": float(per_problem.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "problems": n,
        "mean_length": float(lengths.mean()) if n else 0.0,
        "truncated": int(truncated.sum()),
    }


def k_for(cfg: EvalConfig, benchmark: str) -> int:
    return cfg.k_per_benchmark.get(benchmark, cfg.k)


def sampling_calls(n: int, k: int, prompts_per_batch: int, shares: int, seeds_per_prompt: bool) -> list[tuple]:
    """``(start, stop, seed offset)`` of each sampling call over ``n`` problems, in order; call ``c`` belongs to
    share ``c % shares``. A sampler with one random stream per call samples blocks of ``prompts_per_batch`` problems
    (seed offset: the block's start), so the answers are the same whichever process samples a block; a sampler with
    per-prompt seeds takes each share's problems in one call (seed offset ``start * k``: problem ``j`` is sampled
    with seed ``seed + j * k`` however the problems are split)."""
    if not seeds_per_prompt:
        return [(a, min(a + prompts_per_batch, n), a) for a in range(0, n, prompts_per_batch)]
    size = max(1, math.ceil(n / shares))
    return [(a, min(a + size, n), a * k) for a in range(0, n, size)]


def _sample_and_grade(sampler, tokenizer, problems, calls, cfg: EvalConfig, pools: dict, seed: int) -> list[dict]:
    """This process's sampling calls, each graded by every pool: one dict per call."""
    out = []
    for start, stop, offset in calls:
        chunk = problems[start:stop]
        ro = sampler.sample(
            [render_prompt(tokenizer, p.question) for p in chunk],
            cfg.k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed + offset,
        )
        finished = ro.finished.tolist()
        golds = [p.answer for p in chunk for _ in range(cfg.k)]
        only = None if cfg.grade_truncated else finished
        graded = {name: pool.grade_many(ro.texts, golds, only=only) for name, pool in pools.items()}
        out.append(
            {
                "texts": ro.texts,
                "finished": finished,
                "lengths": ro.lengths.tolist(),
                "ent_sum": ro.entropy_sum(),
                "ent_tokens": int(ro.mask.sum()),
                "verdicts": {name: v for name, (v, _) in graded.items()},
                "timeouts": sum(st.timeouts for _, st in graded.values()),
                "errors": sum(len(st.errors) for _, st in graded.values()),
            }
        )
    return out


def evaluate_problems(
    sampler,
    tokenizer,
    problems,
    cfg: EvalConfig,
    pool: GraderPool,
    extra_pools: dict[str, GraderPool] | None = None,
    seed: int | None = None,
    dist=None,
):
    """Sample ``cfg.k`` answers per problem with ``sampler``, grade them, return ``(metrics, records)``
    (the caller picks the benchmark's k with :func:`k_for`).

    ``problems`` need ``.question`` and ``.answer``; ``records`` is one dict per answer (for ``--samples``).
    ``dist`` (a :class:`nft.dist.Dist`; None: this process alone): every process calls, each samples and grades its
    share of the calls (:func:`sampling_calls`; the processes of one vLLM engine share one), and every process
    returns the same metrics and records, those of one process doing it all."""
    k = cfg.k
    seed = cfg.seed if seed is None else seed
    if cfg.limit:
        problems = problems[: cfg.limit]
    share, shares, leader = sampler.shard(dist) if dist is not None else (0, 1, True)
    calls = sampling_calls(len(problems), k, cfg.prompts_per_batch, shares, getattr(sampler, "seeds_per_prompt", False))
    pools = {"": pool, **(extra_pools or {})}
    mine = _sample_and_grade(sampler, tokenizer, problems, calls[share::shares], cfg, pools, seed)
    parts = dist.gather(mine if leader else None) if dist is not None and dist.world > 1 else [mine]
    by_share = [p for p in parts if p is not None]
    done = [by_share[c % shares][c // shares] for c in range(len(calls))]  # back in call order
    texts = [t for d in done for t in d["texts"]]
    finished = [f for d in done for f in d["finished"]]
    lengths = [n for d in done for n in d["lengths"]]
    golds = [p.answer for p in problems for _ in range(k)]
    # an answer cut at the length limit is wrong, whatever it contains (eval.grade_truncated: graded as the others)
    graded = {
        name: np.array(
            [v and (f or cfg.grade_truncated) for d in done for v, f in zip(d["verdicts"][name], d["finished"])],
            dtype=bool,
        )
        for name in pools
    }
    ok = graded[""].reshape(len(problems), k)
    answers = [extract_boxed(t) for t in texts]
    metrics = summarize(
        ok,
        np.array(lengths).reshape(len(problems), k),
        ~np.array(finished, dtype=bool),
        [answers[i * k : (i + 1) * k] for i in range(len(problems))],
        k,
    )
    # the policy's mean token entropy on its answers (exact for the torch sampler, the -log p estimate for vLLM)
    metrics["entropy"] = sum(d["ent_sum"] for d in done) / max(sum(d["ent_tokens"] for d in done), 1)
    metrics["grader_timeouts"] = sum(d["timeouts"] for d in done)
    metrics["grader_errors"] = sum(d["errors"] for d in done)
    others = {}
    for name in extra_pools or {}:
        ok2 = graded[name].reshape(len(problems), k)
        metrics[f"{name}/avg@{k}"] = float(ok2.mean(axis=1).mean()) if len(problems) else float("nan")
        metrics[f"{name}/disagreement"] = float((ok2 != ok).mean()) if len(problems) else 0.0
        others[name] = ok2.reshape(-1).tolist()
    records = [
        {
            "problem": i // k,
            "sample": i % k,
            "answer_text": texts[i],
            "extracted": answers[i],
            "gold": golds[i],
            "correct": bool(ok.reshape(-1)[i]),
            "finished": bool(finished[i]),
            "length": int(lengths[i]),
            **{f"correct_{n}": others[n][i] for n in others},
        }
        for i in range(len(texts))
    ]
    return metrics, records


def meta_path(out: str | Path) -> Path:
    """Where ``nft evaluate`` writes the settings of the metrics file ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".meta.json")


def eval_benchmarks(result: dict) -> dict[str, dict]:
    """``{benchmark: metrics}`` of an evaluation JSON (``mean`` left out)."""
    return {k: v for k, v in result.items() if k != "mean" and isinstance(v, dict)}


def run_evaluate(
    cfg: EvalConfig,
    model: str,
    out: str | Path,
    *,
    data: str | Path = "data",
    samples: str | Path | None = None,
    threads: int | None = None,
) -> dict:
    """``nft evaluate``: every benchmark of ``cfg`` on the model folder ``model``. Writes atomically the metrics JSON
    ``out`` (metrics only, ``{benchmark: {avg@k, pass@k, maj@k, ...}, "mean": {"avg": ...}}``: what ``dvc exp show``
    tabulates), the settings beside it (``<out stem>.meta.json``: model, config, seconds per benchmark) and the
    per-answer JSONL ``samples``; returns the metrics. Benchmarks and the model are resolved before anything is
    sampled. Under a launcher (``torchrun``, ``srun``: ``WORLD_SIZE`` > 1) every process samples and grades its share
    of each benchmark and rank 0 writes the same files one process would."""
    import time

    import torch
    from transformers import AutoTokenizer

    from .data.benchmarks import load_benchmark
    from .rollout import make_sampler

    sets = {name: load_benchmark(name, data) for name in cfg.benchmarks}
    if not Path(model).is_dir():
        raise FileNotFoundError(f"{model}: model folder not found")
    torch.set_num_threads(threads or cfg.threads)
    dist = join_launcher()
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    sampler = make_sampler(
        cfg.sampler,
        str(model),
        tok,
        seed=cfg.seed,
        vllm=cfg.vllm,
        section="eval",
        memory_mb=cfg.sample_memory_mb,
        stops=cfg.stop_tokens,
    )
    result: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "model": str(model),
        "config": dataclasses.asdict(cfg),
        "seconds": {},
        "graders": {},
        "cpu_isa": cpu_isa(),
    }
    records = []
    pools = {g: GraderPool(cfg.workers, g) for name in sets for g in cfg.graders_of(name)}
    try:
        for name, problems in sets.items():
            t0 = time.perf_counter()
            bcfg = dataclasses.replace(cfg, k=k_for(cfg, name))
            head, *others = cfg.graders_of(name)
            metrics, recs = evaluate_problems(
                sampler, tok, problems, bcfg, pools[head], {g: pools[g] for g in others}, dist=dist
            )
            meta["graders"][name] = [head, *others]
            metrics["skipped_rows"] = problems.skipped
            meta["seconds"][name] = round(time.perf_counter() - t0, 2)
            result[name] = metrics
            records += [{"benchmark": name, "question": problems[r["problem"]].question, **r} for r in recs]
            k = bcfg.k
            if dist.is_main:
                print(
                    f"evaluate: {name}: avg@{k} {metrics[f'avg@{k}']:.4f} pass@{k} "
                    f"{metrics[f'pass@{k}']:.4f} ({metrics['problems']} problems, {meta['seconds'][name]} s)",
                    flush=True,
                )
    finally:
        for p in pools.values():
            p.close()
    accs = [m[f"avg@{k_for(cfg, b)}"] for b, m in result.items()]
    result["mean"] = {"avg": sum(accs) / len(accs) if accs else float("nan")}
    if dist.is_main:
        meta["processes"] = dist.world
        _write_outputs(result, meta, records, Path(model), Path(out), samples)
    return result


def _write_outputs(result: dict, meta: dict, records: list, model: Path, out: Path, samples) -> None:
    """Rank 0's files: the metrics, the settings beside them, the per-answer JSONL; the final metrics into the train
    run that holds ``model``."""
    from .io import atomic_write, atomic_write_json

    atomic_write_json(meta_path(out), meta)
    atomic_write_json(out, result)
    if samples:
        atomic_write(samples, "".join(json.dumps(r) + "\n" for r in records))
    _log_final(model.parent, result, [out, meta_path(out)])


def join_launcher():
    """The launcher's process group (gloo on CPU, NCCL on GPUs, each process on its ``LOCAL_RANK``'s device) when
    one started several processes; a :class:`nft.dist.Dist` of one otherwise."""
    import torch
    import torch.distributed as td

    from .dist import Dist, launched_world_size

    if launched_world_size() > 1 and not td.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist()


def _log_final(run_dir: Path, result: dict, files: list[Path]) -> None:
    """A model inside a tracked run folder (``runs/X/model``): its final evaluation goes into that train run, as
    ``final/<benchmark>/<metric>`` at the run's last step, so MLflow's compare view ranks arms and seeds on it."""
    from .tracking_replay import log_to_run

    if not (run_dir / "mlflow_run_id").is_file():
        return
    done = run_dir / "metrics.json"
    step = int(json.loads(done.read_text()).get("steps", 0)) if done.is_file() else 0
    flat = {f"final/{b}/{k}": v for b, m in eval_benchmarks(result).items() for k, v in m.items()}
    flat["final/mean/avg"] = result["mean"]["avg"]
    log_to_run(run_dir, flat, step, files)
