"""One training run: set-up (``nft.train.setup``: run folder, engine, resume, tracker, sampler), the step loop,
validation (``nft.train.validation``), the final save.

Usage: ``nft train --config params.yaml --arm nft --seed 0 --out runs/nft-s0 [--set train.steps=5 ...]``

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
``rank::world`` of every mini-batch); every process validates its share of the validation sets (all get the same
metrics); rank 0 alone writes the run folder and logs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..algorithms import get_spec, overlong_penalty
from ..dist import Dist
from ..io import atomic_write_json, replace_dir, staging_dir, staging_path
from ..progress import Progress
from ..tracking import MLflowTracker, Tracker
from . import Preempted
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .rollout import collect_rollout, reference_batch
from .setup import Run, check_backends, setup
from .update import update
from .validation import validate

__all__ = ["Preempted", "check_backends", "run_training", "validate"]


def _rollout_step(run: Run, step: int) -> dict:
    """Sample, grade, update, push the new weights to the sampler; returns the step's metrics."""
    cfg = run.cfg
    t0, bytes0 = time.perf_counter(), Dist.bytes_received
    batch, metrics = collect_rollout(
        run.sampler, run.tokenizer, run.train_set, run.cursor, run.pool, cfg, run.rule, run.seed, step, run.dist
    )
    if batch is not None and cfg.overlong_buffer and run.shaped_rewards:
        # on the official -1/+1 scale the penalty is half as large against the 0/1 rewards used here
        scale = 0.5 if cfg.overlong_scale == "official" else 1.0
        pen = overlong_penalty(batch["lengths"], cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        batch["rewards"] = batch["rewards"] + scale * pen.double()
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
    final.update({"steps": run.cfg.steps, "arm": run.arm, "algorithm": run.algo, "seed": run.seed})
    atomic_write_json(run.run_dir / "metrics.json", final)
    if isinstance(run.tracker, MLflowTracker):  # where the weights are (MLflow holds the reference, not a copy)
        run.tracker.set_tags({"nft.model_dir": str(final_model.resolve())})
        run.tracker.log_artifact(run.run_dir / "metrics.json")
    return final


class StopSignal:
    """SIGTERM and SIGUSR1 (a scheduler's notice before it kills or preempts a job: SLURM's ``--signal``) set a flag
    that the step loop reads after each rollout step; the ranks agree through one small collective, so that all of
    them checkpoint the same step and stop."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.got: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._set) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def _set(self, signum, frame) -> None:
        self.got = signal.Signals(signum).name

    def requested(self, dist: Dist) -> bool:
        return dist.sum(1.0 if self.got else 0.0) > 0


def _steps(run: Run, history, progress: bool, on_validate: Callable | None, stop: StopSignal) -> dict:
    """The step loop (validation, progress, checkpoints); returns the last row. On a stop signal: a checkpoint of the
    step just done, then :class:`Preempted`."""
    cfg, dist = run.cfg, run.dist
    bar = Progress(f"train {run.arm}-s{run.seed}", cfg.steps, start=run.start_step, enabled=progress and dist.is_main)
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
        stopping = stop.requested(dist)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
            if dist.is_main:
                history.flush()
                os.fsync(history.fileno())
            save_checkpoint(run.ckpt_dir, run.tokenizer, run.engine, run.cursor, done)
            run.tracker.flush()
        if stopping and done < cfg.steps:
            raise Preempted(
                f"train: stopped by {stop.got or 'a signal to another rank'} after step {done} of {cfg.steps}; "
                f"checkpoint written to {run.ckpt_dir}; rerun the same command to resume"
            )
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
    arm: str | None = None,
    checkpoints: str | Path | None = None,
) -> dict:
    """Train the registered algorithm ``algo`` with ``seed`` into run folder ``out``; resumes from its checkpoint;
    returns final metrics. ``arm``: the study's name of this training configuration (the run's name and its ``arm``
    tag; default ``algo``).

    Under a launcher (``deepspeed``/``torchrun`` with ``train.engine: deepspeed``) every process calls this; rank 0
    alone writes the run folder, logs and validates, and returns the metrics (the other ranks return ``{}``).

    ``on_validate(step, metrics)`` is called after every validation (Optuna reports and prunes from there; an
    exception it raises stops the run with its checkpoint intact). ``checkpoints``: a folder of their own for the
    run's checkpoints (the pipeline's: outside the run folder that DVC caches); default the run folder."""
    run = setup(
        cfg,
        algo,
        seed,
        Path(out),
        study=study,
        full_config=full_config,
        tracker=tracker,
        arm=arm or algo,
        checkpoints=Path(checkpoints) if checkpoints else None,
    )
    if not isinstance(run, Run):
        return run
    history = (run.run_dir / "history.jsonl").open("a") if run.dist.is_main else None
    status = "FAILED"
    try:
        with StopSignal() as stop:
            try:
                final = _finish(run, _steps(run, history, progress, on_validate, stop))
            except Preempted:
                status = "KILLED"
                raise
        status = "FINISHED"
        return final
    finally:
        if history is not None:
            history.close()
        for pool in run.pools.values():
            pool.close()
        run.tracker.finish(status)
