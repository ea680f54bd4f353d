"""The Optuna side of a sweep: the storage (with heartbeats), each worker's sampler and the pruner, creating or
loading the shared study, and counting its finished trials across workers."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any, Literal, cast

from .space import SweepSpace


def _pruner(spec: dict):
    import optuna

    kind = spec.get("type", "median")
    kw = {k: v for k, v in spec.items() if k != "type"}
    if kind == "median":
        return optuna.pruners.MedianPruner(**kw)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(**kw)
    return optuna.pruners.NopPruner()


def worker_seed(sampler_seed: int, worker: str) -> int:
    """A worker's own TPE seed: the space's seed and the worker's id, hashed (recorded on the worker's trials)."""
    return int(hashlib.sha256(f"{sampler_seed}:{worker}".encode()).hexdigest()[:8], 16)


def _storage(url: str, space: SweepSpace):
    """An RDB storage with heartbeats: a trial whose worker stopped beating for ``grace`` seconds is failed by the
    next worker that starts a trial, and retried (its copy's ``retried_trial_number`` names it)."""
    import optuna

    hb = space.heartbeat
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=hb["interval"],
        grace_period=hb["grace"],
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=hb["retries"]),
    )


def _sampler(space: SweepSpace, worker: str):
    import optuna

    if space.sampler == "grid":
        return optuna.samplers.GridSampler(
            {k: cast("list[Any]", p.choices) for k, p in space.params.items()}, seed=space.sampler_seed
        )
    return optuna.samplers.TPESampler(seed=worker_seed(space.sampler_seed, worker))


def create_or_load(study_name: str, storage: str, space: SweepSpace, worker: str, setup=lambda study: None):
    """The study, created by the first worker (which runs ``setup``) and loaded by the others; concurrent creation of
    a fresh storage's tables is retried."""
    import optuna

    kw = dict(study_name=study_name, sampler=_sampler(space, worker), pruner=_pruner(space.pruner))
    for attempt in range(40):
        try:
            store = _storage(storage, space)
            study = optuna.create_study(
                storage=store,
                direction=cast("Literal['minimize', 'maximize']", space.direction),
                load_if_exists=False,
                **kw,
            )
            study.set_user_attr("arms", list(space.arms))  # the order `sweep table` lists them in
            setup(study)
            return study
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(storage=store, **kw)
        except Exception:  # noqa: BLE001 - concurrent creation of the storage's tables
            if attempt == 39:
                raise
            time.sleep(0.2 + random.random() * 0.5)
    raise AssertionError("unreachable")


def max_wait(study, space: SweepSpace) -> float:
    """How long a worker waits for the last trials running elsewhere: ten grace periods, or twice the longest
    finished trial (a RUNNING trial without any heartbeat, its worker dead before the first, is never stale)."""
    longest = max((t.duration.total_seconds() for t in study.get_trials(deepcopy=False) if t.duration), default=0.0)
    return max(10 * space.heartbeat["grace"], 2 * longest)


class FinishedTrials:
    """Optuna callback bounding a study at ``n`` finished trials, all workers together. Finished: complete, pruned,
    or failed and not retried (a dead or preempted worker's trial that was retried counts through its copy), so a setting that
    crashes ends the sweep too. A worker stops asking for trials once the finished, running and waiting ones reach
    ``n``; :func:`nft.sweep.run_sweep` then waits for the running ones, which may belong to a dead worker (failed
    when their heartbeat is stale, and retried)."""

    def __init__(self, n: int):
        self.n = n

    @staticmethod
    def counts(study) -> tuple[int, int, int]:
        """``(finished, running, waiting)`` trials of the study."""
        import optuna
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history
        retried = {n for t in trials for n in history(t)}  # every trial a later copy retries, chains included
        retried |= {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}  # preempted, copied
        finished = sum(
            t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.number not in retried)
            for t in trials
        )
        return (
            finished,
            sum(t.state == TrialState.RUNNING for t in trials),
            sum(t.state == TrialState.WAITING for t in trials),
        )

    def __call__(self, study, trial) -> None:
        if sum(self.counts(study)) >= self.n:
            study.stop()


def default_storage(study_name: str) -> str:
    Path("sweeps").mkdir(exist_ok=True)
    return f"sqlite:///sweeps/{study_name}.db"
