"""A sweep worker: validate the space against the params file, create or join the shared study, run trials until
the study holds enough finished ones (all workers together), and summarise the study."""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import load_study
from .objective import Objective
from .space import SweepSpace, check_arms, grid_points, load_space, override_sets, probe
from .study import FinishedTrials, create_or_load, default_storage, max_wait

if TYPE_CHECKING:
    from ..train.config import TrainConfig


def _setup_parent(
    study,
    *,
    tcfg: TrainConfig,
    sweep_exp: str,
    study_name: str,
    space: SweepSpace,
    space_path: str,
    trials: int,
    seeds: list[int],
) -> None:
    """Run by the worker that creates the study, before the others start: the sweep's MLflow run, which the trials'
    runs nest under (its id is stored on the study)."""
    from ..tracking import MLflowTracker

    if tcfg.tracking:
        parent = MLflowTracker(tcfg.tracking_uri, sweep_exp, f"sweep-{study_name}")
        if not parent.offline:
            parent.set_tags({"sweep": study_name, "arms": ",".join(space.arms)})
            parent.log_params({"space": Path(space_path).name, "trials": trials, "seeds": seeds})
            parent.finish("FINISHED")
            study.set_user_attr("mlflow_parent_run_id", parent.run_id)


def _optimize(study, space: SweepSpace, bound: FinishedTrials, objective: Objective) -> None:
    """Run this worker's trials until the study holds ``bound.n`` finished ones; when the last ones run elsewhere,
    wait for them (their worker may die: they are then failed once stale and retried), at most :func:`max_wait`."""
    import optuna

    waited_since = None
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial past its grace period: failed, retried
        finished, running, waiting = bound.counts(study)
        if finished >= bound.n:
            break
        if finished + running >= bound.n and not waiting:  # the last trials run elsewhere; their worker may die
            waited_since = waited_since or time.time()
            if time.time() - waited_since > max_wait(study, space):
                print(
                    f"sweep: {running} trial(s) still RUNNING with no sign of their worker's end; this worker stops "
                    f"waiting (they are failed once their heartbeat is stale, when a worker next starts a trial)"
                )
                break
            time.sleep(space.heartbeat["interval"])
            continue
        waited_since = None
        try:
            study.optimize(objective, callbacks=[bound], catch=(Exception,), gc_after_trial=False)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            # this worker's trial was failed by a peer (its heartbeat looked stale) and retried there: go on
            print(f"sweep: {e}; its retry runs elsewhere", file=sys.stderr)
        if objective.preempted:
            break


def _summary(study, study_name: str, storage: str) -> dict:
    """The study's trials counted by state, and its best value and parameters once a trial has completed."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False)
    summary = {
        "study": study_name,
        "storage": storage,
        "complete": sum(t.state == TrialState.COMPLETE for t in done),
        "pruned": sum(t.state == TrialState.PRUNED for t in done),
        "failed": sum(t.state == TrialState.FAIL for t in done),
    }
    try:
        summary["best_value"], summary["best_params"] = study.best_value, study.best_params
    except ValueError:
        pass
    return summary


def run_sweep(
    config: str,
    space_path: str,
    trials: int,
    study_name: str,
    storage: str | None = None,
    seeds: list[int] | None = None,
    sets: list[str] | None = None,
    out_dir: str = "sweeps",
    progress: bool = False,
    worker: str | None = None,
) -> dict:
    """Run trials until the study holds ``trials`` finished ones (:class:`FinishedTrials`), all workers together.
    ``worker``: this worker's id (default host-pid), which seeds its sampler. Returns a summary of the study."""
    import warnings

    import optuna

    from ..train.run import run_training

    # heartbeats, stale-trial retries and their helpers are marked experimental in Optuna 5; they are what we use
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    space = load_space(space_path)
    seeds = seeds or [0]
    # validate the base config, the space's base overrides and one sample of every parameter before any work
    base_sets = list(sets or []) + override_sets(space.base)
    cfg0 = load_study(config, base_sets)
    check_arms(space, cfg0["plan"], space_path)
    load_study(config, base_sets + override_sets(probe(space)))
    storage = storage or default_storage(study_name)
    tcfg = cfg0["train"]
    # sweeps in their own experiment, beside (not inside) the study's training runs
    sweep_exp = f"{tcfg.experiment or cfg0['plan'].study.name}-sweeps"
    setup = functools.partial(
        _setup_parent,
        tcfg=tcfg,
        sweep_exp=sweep_exp,
        study_name=study_name,
        space=space,
        space_path=space_path,
        trials=trials,
        seeds=seeds,
    )
    array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    # a task of a SLURM job array keeps its id when the array task is submitted again: its sampler seed too
    worker = worker or (f"slurm-{array[0]}_{array[1]}" if all(array) else f"{socket.gethostname()}-{os.getpid()}")
    study = create_or_load(study_name, storage, space, worker, setup)
    objective = Objective(
        study, space, config, base_sets, seeds, study_name, out_dir, progress, worker, tcfg, sweep_exp, run_training
    )
    bound = FinishedTrials(min(trials, len(grid_points(space))) if space.sampler == "grid" else trials)
    _optimize(study, space, bound, objective)
    if objective.preempted:
        from ..train import Preempted

        raise Preempted(f"sweep: worker {worker} stopped by a signal during {objective.preempted}; a copy is queued")
    return _summary(study, study_name, storage)
