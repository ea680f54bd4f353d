"""One training run: set up (run folder, engine, resume, tracker, sampler), the step loop, validation, the final save.

Usage: ``nft train --config params.yaml --algo nft --seed 0 --out runs/nft-s0 [--set train.steps=5 ...]``

One rollout step:
1. draw P questions from a seeded cursor, sample K answers each, grade them, keep what the algorithm's batch rule
   trains on (``nft.train.rollout``);
2. recompute old log-probs with the trainer (as verl) and log their mismatch with the sampler's;
3. split the kept questions into mini-batches (one optimizer step each) and each mini-batch into micro-batches
   (gradient accumulation, exact) (``nft.train.update``);
4. log namespaced metrics to ``history.jsonl`` and MLflow; validate every ``val_every`` steps; checkpoint every
   ``checkpoint_every`` steps (``nft.train.checkpoint``). Re-running on the same folder resumes from the last
   checkpoint; a finished run (``metrics.json`` present) is not redone.

Seeding (``nft.train.seeds``): one run seed; every other seed is derived from it and logged (``seed/*`` params):
data order, sampling seed per step and generation batch (and rollout shard, under several processes), validation.

Several processes (``train.engine: deepspeed`` under a launcher, see ``nft.train.engines``): each samples and grades
its share of the questions; the kept groups' metadata (rewards, lengths, owners) is gathered so every rank knows the
same mini-batches and normalisers, and each row's tensors go only to the rank that trains on it (rows
``rank::world`` of every mini-batch); rank 0 alone writes the run folder, logs and validates.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml

from .. import cpu_isa
from ..algorithms import get_spec, make_params, overlong_penalty
from ..data.benchmarks import load_benchmark
from ..dist import Dist, launched_world_size
from ..evaluate import EvalConfig, evaluate_problems
from ..flat import flatten
from ..io import atomic_write_json, replace_dir, staging_dir, staging_path
from ..modeling import load_policy
from ..progress import Progress
from ..reward import GraderPool
from ..rollout import Sampler, make_sampler
from ..tracking import MLflowTracker, NullTracker, Tracker
from ..tracking_store import dvc_experiment, git_state, study_run
from .checkpoint import (
    fingerprint,
    has_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    truncate_history,
    usable_checkpoint,
)
from .config import TrainConfig
from .engines import DeepSpeedEngine, Engine, TorchEngine, init_distributed, model_hidden_size, resolve_deepspeed_config
from .rollout import collect_rollout, reference_batch
from .seeds import Cursor, derive_seed, seed_block
from .update import update


def check_backends(cfg: TrainConfig, world: int | None = None) -> dict | None:
    """Misconfigured engines fail here, before any model loads: vLLM missing or asking for more devices than a
    process has, DeepSpeed missing, a DeepSpeed config that contradicts the batch sizes. Returns the resolved
    DeepSpeed config (``None`` for the torch engine)."""
    world = world or launched_world_size()
    if cfg.sampler == "vllm":
        from ..rollout.vllm_sampler import VLLMOptions, check_vllm

        check_vllm(VLLMOptions.from_dict(cfg.vllm), cfg.model, world=world)
    if cfg.engine == "torch":
        if world > 1:
            raise ValueError(
                f"train.engine: torch trains in one process, but the launcher started {world}; "
                f"set train.engine: deepspeed"
            )
        return None
    ds = resolve_deepspeed_config(cfg.deepspeed_config, cfg, world, model_hidden_size(cfg.model))
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "train.engine: deepspeed is not installed here (pip install -e '.[deepspeed]'), or set train.engine: torch"
        )
    return ds


def validate(
    sampler: Sampler, tokenizer, val_sets: dict, pools: dict[str, GraderPool], cfg: TrainConfig, seed: int
) -> dict:
    """avg@k, pass@k, mean length and policy entropy on each validation set (the evaluation code path, each set with
    its k and grader), and their means over sets (``val/mean/avg@{val_k}``: the mean of each set's avg@k)."""
    out, accs, ents = {}, [], []
    t0 = time.perf_counter()
    for name, problems in val_sets.items():
        k = cfg.val_k_per_benchmark.get(name, cfg.val_k)
        grader = cfg.grader_per_set.get(name, cfg.grader)
        ecfg = EvalConfig(
            benchmarks=[name],
            k=k,
            temperature=cfg.val_temperature,
            top_p=cfg.val_top_p,
            max_new_tokens=cfg.max_new_tokens,
            limit=cfg.val_limit,
            graders=[grader],
        )
        m, _ = evaluate_problems(sampler, tokenizer, problems, ecfg, pools[grader], seed=derive_seed(seed, "val", name))
        out[f"val/{name}/avg@{k}"] = m[f"avg@{k}"]
        out[f"val/{name}/pass@{k}"] = m[f"pass@{k}"]
        out[f"val/{name}/length_mean"] = m["mean_length"]
        out[f"val/{name}/entropy"] = m["entropy"]
        accs.append(m[f"avg@{k}"])
        ents.append(m["entropy"])
    out[f"val/mean/avg@{cfg.val_k}"] = float(np.mean(accs))
    out["val/mean/entropy"] = float(np.mean(ents))
    out["time/validate"] = time.perf_counter() - t0
    return out


#: train settings that say where results are logged, not what they are: left out of the run's fingerprint
TRACKING_KEYS = ("experiment", "tracking_uri", "tracking")


@dataclass
class Run:
    """Everything a run's steps share, set up by :func:`_setup`."""

    cfg: TrainConfig
    algo: str
    variant: str
    seed: int
    run_dir: Path
    dist: Dist
    engine: Engine
    tokenizer: Any
    sampler: Sampler
    tracker: Tracker
    pools: dict[str, GraderPool]
    """one pool per grader the run uses (``train.grader``, ``train.grader_per_set``)"""
    cursor: Cursor
    train_set: Any
    val_sets: dict
    rule: str
    overrides: dict
    shaped_rewards: bool
    pad_id: int
    start_step: int

    def record(self, row: dict, history) -> None:
        if self.dist.is_main:
            history.write(json.dumps(row) + "\n")
            history.flush()
            self.tracker.log_metrics(row, row["step"])

    @property
    def pool(self) -> GraderPool:
        """The training set's grader pool."""
        return self.pools[self.cfg.grader_per_set.get(self.cfg.train_set, self.cfg.grader)]

    def validate(self) -> dict:
        """Rank 0 validates (with the other processes of its vLLM engine, if it spans several); the others wait and
        receive its metrics."""
        lead = self.sampler.shard(self.dist)[0] == 0
        out = validate(self.sampler, self.tokenizer, self.val_sets, self.pools, self.cfg, self.seed) if lead else None
        return self.dist.broadcast(out)


def _prepare_folder(run_dir: Path, fp: str, dist: Dist) -> dict | None:
    """Start afresh on a folder of another configuration; return the final metrics of a finished run (``{}`` on
    ranks other than 0), else ``None``."""
    fp_file, final_path = run_dir / "fingerprint", run_dir / "metrics.json"
    if dist.is_main and run_dir.is_dir() and fp_file.is_file() and fp_file.read_text().strip() != fp:
        print(
            f"train: {run_dir} holds a run with another configuration, base model or data; starting afresh",
            file=sys.stderr,
        )
        shutil.rmtree(run_dir)
    dist.barrier()
    if final_path.is_file() and fp_file.is_file():
        if not dist.is_main:
            return {}
        print(f"train: {run_dir} is finished (metrics.json present); nothing to do")
        return json.loads(final_path.read_text())
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fp_file.write_text(fp)
    return None


def _make_tracker(
    cfg: TrainConfig,
    run_dir: Path,
    name: str,
    resume: bool,
    dist: Dist,
    tracker: Tracker | None,
    experiment: str,
    tags: dict,
) -> Tracker:
    """The run's tracker: nested under the study's run (``nft.tracking_store.study_run``), continued on resume."""
    if not dist.is_main:
        return NullTracker()
    if tracker is not None:
        return tracker
    if not cfg.tracking:
        return NullTracker()
    run_id_file, tags_file = run_dir / "mlflow_run_id", run_dir / "tags.json"
    run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    if run_id and tags_file.is_file():  # a resumed run keeps its place under the study's run
        parent = json.loads(tags_file.read_text()).get("mlflow.parentRunId")
    else:
        parent = study_run(cfg.tracking_uri, experiment)
    if parent:
        tags["mlflow.parentRunId"] = parent
    tracker = MLflowTracker(
        cfg.tracking_uri,
        experiment,
        name,
        run_id=run_id,
        parent_run_id=None if run_id else parent,
        flush_every=5,
        tags=tags,
    )
    if tracker.run_id and not tracker.offline:
        run_id_file.write_text(tracker.run_id)
        tracker.start_system_metrics()
    return tracker


def _setup(
    cfg: TrainConfig,
    algo: str,
    seed: int,
    run_dir: Path,
    *,
    study: str,
    full_config: dict | None,
    tracker: Tracker | None,
    variant: str,
) -> Run | dict:
    """Validate, then set up the run (or return the final metrics of a finished one)."""
    params = make_params(algo, **dict(cfg.loss.get(algo, {}) or {}))  # unknown algorithm: error before any work
    spec = get_spec(algo)
    rule = spec.batch_rule if cfg.batch_rule == "auto" else cfg.batch_rule
    train_set = load_benchmark(cfg.train_set, cfg.data)
    if spec.reference and not all(getattr(q, "solution", "") for q in train_set):
        raise ValueError(
            f"train.train_set: {algo} trains on worked solutions, and {cfg.train_set!r} has none "
            f"(the synthetic pool has them)"
        )
    val_sets = {name: load_benchmark(name, cfg.data) for name in cfg.val_benchmarks}
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"train.model: {cfg.model}: base model folder not found")
    ds_config = check_backends(cfg)
    resolved: dict[str, Any] = {
        "algo": algo,
        "seed": seed,
        "batch_rule": rule,
        "loss": asdict(params),
        "train": asdict(cfg),
    }
    results_of = {**resolved, "train": {k: v for k, v in resolved["train"].items() if k not in TRACKING_KEYS}}
    dist = init_distributed(cfg.engine)
    done = _prepare_folder(run_dir, fingerprint(results_of, train_set, val_sets, cfg.model), dist)
    if done is not None:
        return done
    # ranks on one machine share its cores: more threads than that only contend (and OpenMP spins)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    torch.set_num_threads(max(1, min(cfg.threads, (os.cpu_count() or 1) // max(per_node, 1))))
    seeds = seed_block(seed)
    # rank 0 checks the checkpoints (and sets damaged ones aside); every rank takes its answer
    had = has_checkpoint(run_dir) if dist.is_main else False
    ckpt = dist.broadcast(str(usable_checkpoint(run_dir) or "") if dist.is_main else None) or None
    if had and ckpt is None and dist.is_main:
        print(f"train: {run_dir} has no usable checkpoint; starting the run afresh", file=sys.stderr)
    resume = ckpt is not None
    source = str(Path(cast(str, ckpt)) / "model") if resume else cfg.model  # the weights this process starts from
    model, tokenizer = load_policy(source)
    if ds_config is None and torch.cuda.is_available():
        model = model.cuda()  # DeepSpeed places its own
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine = TorchEngine(model, cfg) if ds_config is None else DeepSpeedEngine(model, cfg, ds_config)
    cursor, start_step = Cursor(len(train_set), seeds["seed/data_order"]), 0
    if resume:
        assert ckpt is not None  # resume means a checkpoint was found
        cursor, start_step = restore_checkpoint(Path(ckpt), engine, len(train_set), seeds["seed/data_order"])
        if dist.is_main:
            truncate_history(run_dir / "history.jsonl", start_step)
    elif dist.is_main:
        (run_dir / "history.jsonl").unlink(missing_ok=True)
    tags = {
        "algo": algo,
        "variant": variant,
        "seed": str(seed),
        "study": study,
        "dvc.exp_name": dvc_experiment(),
        "mlflow.source.name": "nft train",
        "mlflow.source.type": "LOCAL",
        **git_state(),
        "data_hash": train_set.hash,
        "batch_rule": rule,
        "engine": cfg.engine,
        "sampler": cfg.sampler,
        "processes": str(dist.world),
        "cpu_isa": cpu_isa(),
    }
    if dist.is_main:
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump({**(full_config or {}), "resolved": resolved}, sort_keys=False)
        )
    tracker = _make_tracker(cfg, run_dir, f"{variant}-s{seed}", resume, dist, tracker, cfg.experiment or study, tags)
    if dist.is_main:
        (run_dir / "tags.json").write_text(json.dumps(tags, indent=2))
    if not resume:
        tracker.log_params({**flatten(resolved), **seeds})
        tracker.set_tags(tags)
        if isinstance(tracker, MLflowTracker):
            tracker.log_dataset(
                train_set.name,
                train_set.hash,
                str(Path(cfg.data).resolve() / f"{cfg.train_set}.jsonl") if cfg.train_set == "train" else cfg.train_set,
            )
            tracker.log_artifact(run_dir / "config.yaml")
    sampler = make_sampler(
        cfg.sampler, source, tokenizer, seed=seed, vllm=cfg.vllm, weights=engine.rollout_weights(), dtype=engine.dtype
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # DAPO's overlong penalty shapes the reward; losses that need 0/1 rewards (NFT, RFT) never get it
    graders = {cfg.grader_per_set.get(name, cfg.grader) for name in [cfg.train_set, *cfg.val_benchmarks]}
    return Run(
        cfg,
        algo,
        variant,
        seed,
        run_dir,
        dist,
        engine,
        tokenizer,
        sampler,
        tracker,
        {g: GraderPool(cfg.grader_workers, g) for g in sorted(graders)},
        cursor,
        train_set,
        val_sets,
        rule,
        dict(cfg.loss.get(algo, {}) or {}),
        not getattr(params, "binary_rewards", False),
        pad_id,
        start_step,
    )


def _rollout_step(run: Run, step: int) -> dict:
    """Sample, grade, update, push the new weights to the sampler; returns the step's metrics."""
    cfg = run.cfg
    t0, bytes0 = time.perf_counter(), Dist.bytes_received
    batch, metrics = collect_rollout(
        run.sampler, run.tokenizer, run.train_set, run.cursor, run.pool, cfg, run.rule, run.seed, step, run.dist
    )
    if batch is not None and cfg.overlong_buffer and run.shaped_rewards:
        batch["rewards"] = (
            batch["rewards"]
            + overlong_penalty(batch["lengths"], cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty).double()
        )
    if get_spec(run.algo).reference:  # the supervised control: sampled for its metrics, trained on solutions
        batch = reference_batch(run.tokenizer, run.train_set, run.cursor, cfg)
    if batch is not None and len(batch["rewards"]):
        run.sampler.sleep()  # vllm.sleep: the GPU's memory to the trainer (woken by the push / sampling)
        metrics.update(update(run.engine, batch, run.algo, run.overrides, cfg, run.pad_id, run.seed, step))
        t_push = time.perf_counter()
        run.sampler.update_weights(run.engine.rollout_weights())
        metrics["time/weight_push"] = time.perf_counter() - t_push
    else:
        metrics["train/skipped"] = 1.0
    metrics["time/step"] = time.perf_counter() - t0
    if run.dist.world > 1:  # what this rank received from the others in the step's collectives
        metrics["perf/bytes_received"] = float(Dist.bytes_received - bytes0)
    return metrics


def _finish(run: Run, last: dict) -> dict:
    """Save the final model; rank 0 writes ``metrics.json`` (the run is finished once it exists) and returns it."""
    final_model = run.run_dir / "model"
    tmp = staging_dir(final_model) if run.dist.is_main else staging_path(final_model)
    run.dist.barrier()
    run.engine.save_model(tmp, run.tokenizer)
    if not run.dist.is_main:
        return {}
    replace_dir(tmp, final_model)
    if not last:  # resumed at the end
        lines = (run.run_dir / "history.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    final = {k: v for k, v in last.items() if k.startswith("val/")}
    final.update({"steps": run.cfg.steps, "algo": run.algo, "seed": run.seed})
    atomic_write_json(run.run_dir / "metrics.json", final)
    if isinstance(run.tracker, MLflowTracker):  # where the weights are (MLflow holds the reference, not a copy)
        run.tracker.set_tags({"nft.model_dir": str(final_model.resolve())})
        run.tracker.log_artifact(run.run_dir / "metrics.json")
    return final


def _steps(run: Run, history, progress: bool, on_validate: Callable | None) -> dict:
    """The step loop (validation, progress, checkpoints); returns the last row."""
    cfg, dist = run.cfg, run.dist
    bar = Progress(
        f"train {run.variant}-s{run.seed}", cfg.steps, start=run.start_step, enabled=progress and dist.is_main
    )
    if run.start_step == 0:
        row = {"step": 0, **run.validate()}
        run.record(row, history)
        if on_validate and dist.is_main:
            on_validate(0, row)
    last: dict = {}
    bad_in_a_row = 0
    for step in range(run.start_step, cfg.steps):
        metrics = _rollout_step(run, step)
        done = step + 1
        skipped = int(metrics.get("train/skipped_steps", 0))
        bad_in_a_row = bad_in_a_row + 1 if skipped and skipped == metrics.get("train/optimizer_steps") else 0
        if skipped and dist.is_main:
            print(
                f"train: step {done}: {skipped} optimizer step(s) skipped (non-finite loss or gradient norm)",
                file=sys.stderr,
            )
        if bad_in_a_row >= cfg.max_skipped_steps:
            raise RuntimeError(
                f"train: every optimizer step of {bad_in_a_row} rollout steps in a row was skipped "
                f"(non-finite loss or gradient norm; last: step {done}); nothing was applied, the last "
                f"checkpoint is intact: lower train.lr (or fix the data) and rerun to resume"
            )
        if (cfg.val_every and done % cfg.val_every == 0) or done == cfg.steps:
            metrics.update(run.validate())
        last = {"step": done, **metrics}
        run.record(last, history)
        val = [v for k, v in metrics.items() if k.startswith("val/mean/")]
        bar.update(
            done,
            reward=metrics["rollout/accuracy"],
            **({"val": val[0]} if val else {}),
            **{"tokens/s": round(metrics.get("perf/sample_tokens_per_s", 0.0))},
        )
        if on_validate and dist.is_main and any(k.startswith("val/") for k in metrics):
            on_validate(done, last)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if dist.is_main:
                history.flush()
                os.fsync(history.fileno())
            save_checkpoint(run.run_dir, run.tokenizer, run.engine, run.cursor, done)
            run.tracker.flush()
    return last


def run_training(
    cfg: TrainConfig,
    algo: str,
    seed: int,
    out: str | Path,
    *,
    study: str = "nft-study",
    full_config: dict | None = None,
    progress: bool = True,
    tracker: Tracker | None = None,
    on_validate: Callable | None = None,
    variant: str | None = None,
) -> dict:
    """Train ``algo`` with ``seed`` into run folder ``out``; resumes from its checkpoint; returns final metrics.

    Under a launcher (``deepspeed``/``torchrun`` with ``train.engine: deepspeed``) every process calls this; rank 0
    alone writes the run folder, logs and validates, and returns the metrics (the other ranks return ``{}``).

    ``on_validate(step, metrics)`` is called after every validation (Optuna reports and prunes from there; an
    exception it raises stops the run with its checkpoint intact)."""
    run = _setup(
        cfg, algo, seed, Path(out), study=study, full_config=full_config, tracker=tracker, variant=variant or algo
    )
    if not isinstance(run, Run):
        return run
    history = (run.run_dir / "history.jsonl").open("a") if run.dist.is_main else None
    status = "FAILED"
    try:
        final = _finish(run, _steps(run, history, progress, on_validate))
        status = "FINISHED"
        return final
    finally:
        if history is not None:
            history.close()
        for pool in run.pools.values():
            pool.close()
        run.tracker.finish(status)
