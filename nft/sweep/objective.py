"""One trial of a sweep: the trial's setting trained once per arm and seed, each run's validations reported
to the pruner, and the objective the mean of the runs' last validations. With tracking on, the trial is an MLflow
run nested under the sweep's run."""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import load_study
from ..tracking import NullTracker
from .space import SweepSpace, override_sets, suggest
from .study import worker_seed

if TYPE_CHECKING:
    from ..tracking import MLflowTracker
    from ..train.config import TrainConfig


def parent_run(study, tcfg: TrainConfig) -> str | None:
    """The sweep's MLflow run (set by the worker that created the study; waited for, 60 s at most)."""
    deadline = time.time() + 60
    while tcfg.tracking:
        pid = study.user_attrs.get("mlflow_parent_run_id")
        if pid or time.time() > deadline:
            return pid
        time.sleep(0.5)
    return None


@dataclass
class Reporter:
    """A run's ``on_validate`` callback: reports to the pruner the mean of the trial's finished runs' values and this
    run's latest, at ``offset + step`` so that the trial's runs take consecutive steps; prunes the trial when the
    pruner says so."""

    trial: Any
    metric: str
    finals: list[float]
    """the values of the trial's runs finished so far (the trial's own list, appended to as runs finish)"""
    offset: int
    arm: str
    seed: int

    def __call__(self, step, row) -> None:
        import optuna

        if self.metric in row and math.isfinite(row[self.metric]):
            done = self.finals + [row[self.metric]]
            self.trial.report(sum(done) / len(done), self.offset + step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at {self.arm} seed {self.seed} step {step}")


@dataclass
class Objective:
    """The function ``study.optimize`` calls for each of this worker's trials. ``tcfg`` is the base config's train
    section (where the trials are tracked); ``base_sets`` the overrides every
    trial starts from; ``run_training`` trains one run (:func:`nft.train.run.run_training`, imported by the caller
    before the first trial)."""

    study: Any
    space: SweepSpace
    config: str
    base_sets: list[str]
    seeds: list[int]
    study_name: str
    out_dir: str
    progress: bool
    worker: str
    tcfg: TrainConfig
    sweep_exp: str
    run_training: Callable[..., dict]
    preempted: str = ""
    """set when a trial stopped on a scheduler's signal (SIGTERM, SIGUSR1): this worker then stops."""

    def __call__(self, trial) -> float:
        import optuna

        from ..train import Preempted

        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("sampler_seed", worker_seed(self.space.sampler_seed, self.worker))
        self._mark_retry(trial)
        try:
            values = suggest(trial, self.space)
            cfg = load_study(self.config, self.base_sets + override_sets(values))
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            raise
        full = {k: dataclasses.asdict(v) for k, v in cfg.items() if not k.startswith("_")}
        tracker = self._tracker(trial, values)
        status = "FAILED"
        try:
            value = self._train(trial, cfg, full, tracker)
            if tracker:
                tracker.log_metrics({"objective": value}, trial.number)
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            raise
        except Preempted as e:
            self._requeue(trial, values, e)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            raise
        finally:
            if tracker:
                tracker.set_tags({"trial_state": {"FINISHED": "complete", "KILLED": "pruned"}.get(status, "failed")})
                tracker.finish(status)

    def _requeue(self, trial, values: dict[str, Any], e: Exception) -> None:
        """A trial stopped by a scheduler's signal (a preempted or timed-out SLURM job): the trial fails, a copy of
        it is queued for any worker, and this worker stops after it (:func:`nft.sweep.runner.run_sweep` then raises
        :class:`nft.train.Preempted`: exit 143)."""
        self.preempted = f"trial {trial.number}"
        trial.set_user_attr("error", f"Preempted: {e}"[:2000])
        reason = f"trial {trial.number} of worker {self.worker} was stopped by a signal (preempted)"
        self.study.enqueue_trial(values, user_attrs={"retry_of": trial.number, "retry_reason": reason})
        self.study.stop()

    def _mark_retry(self, trial) -> None:
        """The copy of a dead worker's trial: record which trial it retries and why."""
        import optuna

        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)
        retried = history[-1] if history else None
        if retried is not None:
            dead = next(t for t in self.study.get_trials(deepcopy=False) if t.number == retried)
            trial.set_user_attr("retry_of", retried)
            trial.set_user_attr(
                "retry_reason",
                f"trial {retried} of worker {dead.user_attrs.get('worker', '?')} "
                f"failed: its heartbeat stopped (the worker died)",
            )

    def _tracker(self, trial, values: dict[str, Any]) -> MLflowTracker | None:
        """The trial's MLflow run, nested under the sweep's; None without tracking or without the sweep's run."""
        from ..tracking import MLflowTracker

        parent_id = parent_run(self.study, self.tcfg)
        if not (self.tcfg.tracking and parent_id):
            return None
        tracker = MLflowTracker(
            self.tcfg.tracking_uri, self.sweep_exp, f"{self.study_name}-trial{trial.number}", parent_run_id=parent_id
        )
        tracker.log_params({**values, "seeds": ",".join(map(str, self.seeds)), "trial": trial.number})
        tracker.set_tags({"sweep": self.study_name, "trial": str(trial.number)})
        return tracker

    def _train(self, trial, cfg: dict, full: dict, tracker: MLflowTracker | None) -> float:
        """One run per arm and seed, in turn (each arm with its settings from the study's ``arm_settings``); returns the
        mean of their final values of the metric. The runs take consecutive pruner steps (validation steps 0 to
        ``steps`` each)."""
        space = self.space
        finals: list[float] = []
        offset = 0
        for arm, seed in ((a, s) for a in space.arms for s in self.seeds):
            algo, train = cfg["plan"].arm(arm, cfg["train"])
            report = Reporter(trial, space.metric, finals, offset, arm, seed)
            offset += train.steps + 1
            name = f"trial{trial.number}-s{seed}" if len(space.arms) == 1 else f"trial{trial.number}-{arm}-s{seed}"
            final = self.run_training(
                train,
                algo,
                seed,
                Path(self.out_dir) / self.study_name / name,
                study=self.study_name,
                full_config=full,
                progress=self.progress,
                tracker=NullTracker(),
                on_validate=report,
                arm=arm,
            )
            if space.metric not in final:
                raise ValueError(f"metric {space.metric!r} not in the run's final metrics {sorted(final)}")
            finals.append(final[space.metric])
            trial.set_user_attr(f"value/{arm}/s{seed}", final[space.metric])
            if tracker:
                key = f"seed{seed}" if len(space.arms) == 1 else f"{arm}/seed{seed}"
                tracker.log_metrics({f"{key}/{space.metric}": final[space.metric]}, trial.number)
        return sum(finals) / len(finals)
