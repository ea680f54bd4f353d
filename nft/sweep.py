"""Optuna sweeps over an algorithm's hyperparameters, on one machine or many sharing one storage.

    nft sweep --config params.yaml --space experiments/sweeps/nft.yaml --trials 20 --study-name nft-lr \\
              [--storage sqlite:///sweeps/nft-lr.db | postgresql://user@host/db] [--seeds 0,1]
    nft sweep best --study-name nft-lr --storage URL --config params.yaml --out best.yaml

Every worker runs the same command against one storage, with Optuna's own machinery only: ``study.optimize`` on an
``RDBStorage`` with heartbeats, so that a worker that dies (kill -9, a lost machine) leaves a trial that the other
workers mark failed once its heartbeat is stale (``heartbeat.grace`` seconds) and retry
(``RetryHeartbeatStaleTrialCallback``: the copy records the trial it retries); ``MaxTrialsCallback`` bounds the study at
``--trials`` finished (complete or pruned) trials; each worker's TPE sampler has its own seed, derived from the space's
``sampler_seed`` and the worker's id (recorded on its trials), so workers do not suggest the same points. A ``grid``
space runs each point once (Optuna's ``GridSampler``). A trial trains one short run per algorithm and seed
(cleanrl's tuner: seeds in turn) and reports the validation metric after every validation to the pruner; the
objective is the mean of the last validations. A trial that crashes is marked failed with its error and the sweep
goes on.

The space file::

    algo: nft                      # the algorithm swept
    metric: val/mean/avg@4         # objective: a validation metric of the history
    direction: maximize
    pruner: {type: median, n_startup_trials: 2, n_warmup_steps: 0}   # or {type: hyperband}, {type: none}
    sampler_seed: 0                # TPE seed (each worker derives its own from it)
    heartbeat: {interval: 60, grace: 180, retries: 1}   # a dead worker's trial: failed after grace s, retried
    base: {train.steps: 10, train.val_every: 2}                      # overrides for every trial
    params:
      train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      train.loss.nft.eps: {type: float, low: 0.5, high: 1.0}
      train.loss.nft.omega: {type: categorical, choices: [one, one_minus_r, sqrt]}
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from .config import ConfigError, apply_overrides, from_dict, load_study, load_yaml
from .tracking import NullTracker


@dataclass
class ParamSpec:
    """One searched parameter."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    def __post_init__(self):
        if self.type not in ("float", "int", "categorical"):
            raise ValueError(f"type: expected float, int or categorical, got {self.type!r}")
        if self.type == "categorical" and not self.choices:
            raise ValueError("choices: a categorical parameter needs a non-empty list")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"low/high: need low <= high, got {self.low}, {self.high}")
        if self.log and self.type != "categorical" and (self.low or 0) <= 0:
            raise ValueError("log: a log-scale range needs low > 0")


@dataclass
class SweepSpace:
    """A sweep space file (experiments/sweeps/*.yaml)."""

    algo: str = "nft"
    algos: list[str] = field(default_factory=list)
    """several algorithms: every trial trains each (with the same setting) and the objective is the mean over
    algorithms and seeds, so one shared setting is chosen for all (as the paper's one lr), never by one algorithm's
    score. Empty: ``[algo]``."""
    metric: str = "val/mean/avg@4"
    direction: str = "maximize"
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    sampler: str = "tpe"
    """``tpe`` (Optuna's default), or ``grid``: every combination of the (categorical) parameters' choices, once."""
    sampler_seed: int = 0
    heartbeat: dict[str, Any] = field(default_factory=lambda: {"interval": 60, "grace": 180, "retries": 1})
    """``interval``: seconds between a running trial's heartbeats; ``grace``: a trial whose last heartbeat is older is
    a dead worker's (failed, then retried up to ``retries`` times)."""
    base: dict[str, Any] = field(default_factory=dict)
    params: dict[str, ParamSpec] = field(default_factory=dict)

    def __post_init__(self):
        from .algorithms import LOSSES

        self.algos = list(self.algos) or [self.algo]
        bad = [a for a in self.algos if a not in LOSSES]
        if bad:
            raise ValueError(f"algos: unknown {bad}; registered: {sorted(LOSSES)}")
        if self.direction not in ("maximize", "minimize"):
            raise ValueError(f"direction: expected maximize or minimize, got {self.direction!r}")
        unknown = sorted(set(self.heartbeat) - {"interval", "grace", "retries"})
        if unknown:
            raise ValueError(f"heartbeat: unknown key(s) {unknown}; valid: interval, grace, retries")
        hb = {"interval": 60, "grace": 180, "retries": 1, **self.heartbeat}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in hb.values()):
            raise ValueError(f"heartbeat: interval, grace and retries are whole numbers (seconds, count), got {hb}")
        if not (0 < hb["interval"] < hb["grace"]) or hb["retries"] < 0:
            raise ValueError(f"heartbeat: need 0 < interval < grace and retries >= 0, got {hb}")
        self.heartbeat = hb
        if self.sampler not in ("tpe", "grid"):
            raise ValueError(f"sampler: expected tpe or grid, got {self.sampler!r}")
        if self.pruner.get("type", "median") not in ("median", "hyperband", "none"):
            raise ValueError(f"pruner.type: expected median, hyperband or none, got {self.pruner.get('type')!r}")


def load_space(path: str | Path) -> SweepSpace:
    raw = load_yaml(path)
    params = raw.get("params") or {}
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{path}: params: expected a non-empty mapping of key -> spec")
    try:
        specs = {k: from_dict(ParamSpec, v, f"params.{k}") for k, v in params.items()}
        space = from_dict(SweepSpace, {**raw, "params": {}}, "")
        if space.sampler == "grid" and any(p.type != "categorical" for p in specs.values()):
            raise ConfigError("sampler: grid needs every parameter categorical (its choices are the grid)")
        return dataclasses.replace(space, params=specs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def suggest(trial, space: SweepSpace) -> dict[str, Any]:
    out = {}
    for key, p in space.params.items():
        if p.type == "float":
            out[key] = trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)
        elif p.type == "int":
            assert p.low is not None and p.high is not None  # ParamSpec requires them for non-categorical types
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[key] = trial.suggest_categorical(key, p.choices)
    return out


def _sets(values: dict[str, Any]) -> list[str]:
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]


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
    import hashlib

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


def _create_or_load(study_name: str, storage: str, space: SweepSpace, worker: str, setup=lambda study: None):
    """The study, created by the first worker (which runs ``setup``) and loaded by the others; concurrent creation of
    a fresh storage's tables is retried."""
    import random
    import time

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
            study.set_user_attr("algos", list(space.algos))  # the order `sweep table` lists them in
            setup(study)
            return study
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(storage=store, **kw)
        except Exception:  # noqa: BLE001 - concurrent creation of the storage's tables
            if attempt == 39:
                raise
            time.sleep(0.2 + random.random() * 0.5)
    raise AssertionError("unreachable")


def grid_points(space: SweepSpace) -> list[dict]:
    """Every combination of the parameters' choices (a ``grid`` space), in the file's order."""
    import itertools

    keys = list(space.params)
    return [
        dict(zip(keys, combo))
        for combo in itertools.product(*(cast("list[Any]", space.params[k].choices) for k in keys))
    ]


def _max_wait(study, space: SweepSpace) -> float:
    """How long a worker waits for the last trials running elsewhere: ten grace periods, or twice the longest
    finished trial (a RUNNING trial without any heartbeat, its worker dead before the first, is never stale)."""
    longest = max((t.duration.total_seconds() for t in study.get_trials(deepcopy=False) if t.duration), default=0.0)
    return max(10 * space.heartbeat["grace"], 2 * longest)


class FinishedTrials:
    """Optuna callback bounding a study at ``n`` finished trials, all workers together. Finished: complete, pruned,
    or failed and not retried (a dead worker's trial that was retried counts through its copy), so a setting that
    crashes ends the sweep too. A worker stops asking for trials once the finished, running and waiting ones reach
    ``n``; :func:`run_sweep` then waits for the running ones, which may belong to a dead worker (failed when their
    heartbeat is stale, and retried)."""

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
    from optuna.trial import TrialState

    from .tracking import MLflowTracker
    from .train.run import run_training

    # heartbeats, stale-trial retries and their helpers are marked experimental in Optuna 5; they are what we use
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    space = load_space(space_path)
    seeds = seeds or [0]
    # validate the base config, the space's base overrides and one sample of every parameter before any work
    base_sets = list(sets or []) + _sets(space.base)
    cfg0 = load_study(config, base_sets)
    probe = {
        k: (
            cast("list[Any]", p.choices)[0]
            if p.type == "categorical"
            else p.low
            if p.type == "float"
            else int(cast(float, p.low))
        )
        for k, p in space.params.items()
    }
    load_study(config, base_sets + _sets(probe))
    storage = storage or default_storage(study_name)
    tcfg = cfg0["train"]
    # sweeps in their own experiment, beside (not inside) the study's training runs
    sweep_exp = f"{tcfg.experiment or cfg0['plan'].study.name}-sweeps"

    def setup(study):  # by the worker that creates the study, before the others start
        if tcfg.tracking:
            parent = MLflowTracker(tcfg.tracking_uri, sweep_exp, f"sweep-{study_name}")
            if not parent.offline:
                parent.set_tags({"sweep": study_name, "algo": ",".join(space.algos)})
                parent.log_params({"space": Path(space_path).name, "trials": trials, "seeds": seeds})
                parent.finish("FINISHED")
                study.set_user_attr("mlflow_parent_run_id", parent.run_id)

    worker = worker or f"{socket.gethostname()}-{os.getpid()}"
    study = _create_or_load(study_name, storage, space, worker, setup)

    def parent_run() -> str | None:
        """The sweep's MLflow run (set by the worker that created the study; waited for, 60 s at most)."""
        deadline = time.time() + 60
        while tcfg.tracking:
            pid = study.user_attrs.get("mlflow_parent_run_id")
            if pid or time.time() > deadline:
                return pid
            time.sleep(0.5)
        return None

    steps_per_seed = tcfg.steps + 1

    def objective(trial):
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("sampler_seed", worker_seed(space.sampler_seed, worker))
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(frozen)
        retried = history[-1] if history else None
        if retried is not None:  # the copy of a dead worker's trial: say which and why
            dead = next(t for t in study.get_trials(deepcopy=False) if t.number == retried)
            trial.set_user_attr("retry_of", retried)
            trial.set_user_attr(
                "retry_reason",
                f"trial {retried} of worker {dead.user_attrs.get('worker', '?')} "
                f"failed: its heartbeat stopped (the worker died)",
            )
        try:
            values = suggest(trial, space)
            cfg = load_study(config, base_sets + _sets(values))
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            raise
        full = {k: dataclasses.asdict(v) for k, v in cfg.items() if not k.startswith("_")}
        tracker = None
        parent_id = parent_run()
        if tcfg.tracking and parent_id:
            tracker = MLflowTracker(
                tcfg.tracking_uri, sweep_exp, f"{study_name}-trial{trial.number}", parent_run_id=parent_id
            )
            tracker.log_params({**values, "seeds": ",".join(map(str, seeds)), "trial": trial.number})
            tracker.set_tags({"sweep": study_name, "trial": str(trial.number)})
        finals = []
        status = "FAILED"
        try:
            for i, (algo, seed) in enumerate((a, s) for a in space.algos for s in seeds):

                def report(step, row, i=i, algo=algo, seed=seed):
                    if space.metric in row and math.isfinite(row[space.metric]):
                        done = finals + [row[space.metric]]
                        trial.report(sum(done) / len(done), i * steps_per_seed + step)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f"pruned at {algo} seed {seed} step {step}")

                name = (
                    f"trial{trial.number}-s{seed}" if len(space.algos) == 1 else f"trial{trial.number}-{algo}-s{seed}"
                )
                final = run_training(
                    cfg["train"],
                    algo,
                    seed,
                    Path(out_dir) / study_name / name,
                    study=study_name,
                    full_config=full,
                    progress=progress,
                    tracker=NullTracker(),
                    on_validate=report,
                )
                if space.metric not in final:
                    raise ValueError(f"metric {space.metric!r} not in the run's final metrics {sorted(final)}")
                finals.append(final[space.metric])
                trial.set_user_attr(f"value/{algo}/s{seed}", final[space.metric])
                if tracker:
                    key = f"seed{seed}" if len(space.algos) == 1 else f"{algo}/seed{seed}"
                    tracker.log_metrics({f"{key}/{space.metric}": final[space.metric]}, trial.number)
            value = sum(finals) / len(finals)
            if tracker:
                tracker.log_metrics({"objective": value}, trial.number)
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            raise
        finally:
            if tracker:
                tracker.set_tags({"trial_state": {"FINISHED": "complete", "KILLED": "pruned"}.get(status, "failed")})
                tracker.finish(status)

    bound = FinishedTrials(min(trials, len(grid_points(space))) if space.sampler == "grid" else trials)
    waited_since = None
    while True:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial past its grace period: failed, retried
        finished, running, waiting = bound.counts(study)
        if finished >= bound.n:
            break
        if finished + running >= bound.n and not waiting:  # the last trials run elsewhere; their worker may die
            waited_since = waited_since or time.time()
            if time.time() - waited_since > _max_wait(study, space):
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


def sweep_table(study_name: str, storage: str) -> str:
    """The study's trials as a Markdown table, best first: parameters, each algorithm's value (mean over seeds), the
    objective and the state (the tables of docs/log.md)."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    params = sorted({k for t in trials for k in t.params})
    seen = list(dict.fromkeys(k.split("/")[1] for t in trials for k in t.user_attrs if k.startswith("value/")))
    algos = [a for a in study.user_attrs.get("algos", []) if a in seen] + sorted(
        set(seen) - set(study.user_attrs.get("algos", []))
    )
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    trials.sort(key=lambda t: (t.value is None, sign * (t.value or 0.0), t.number))
    lines = [
        "| trial | " + " | ".join(params + algos) + " | objective | state |",
        "|---" * (len(params) + len(algos) + 3) + "|",
    ]
    for t in trials:
        cells = [
            f"{t.params[p]:.3g}" if isinstance(t.params.get(p), float) else str(t.params.get(p, "–")) for p in params
        ]
        for a in algos:
            vals = [v for k, v in t.user_attrs.items() if k.startswith(f"value/{a}/")]
            cells.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "–")
        obj = f"{100 * t.value:.1f}" if t.value is not None else "–"
        lines.append(f"| {t.number} | " + " | ".join(cells) + f" | {obj} | {t.state.name.lower()} |")
    return "\n".join(lines) + "\n"


def write_best(study_name: str, storage: str, config: str, out: str) -> dict:
    """Write ``config`` with the best trial's parameters applied: a params file for ``dvc exp run`` or ``nft``."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    try:
        best = study.best_trial
    except ValueError:
        raise ValueError(f"study {study_name!r}: no completed trial yet") from None
    load_study(config, _sets(best.params))  # the result must be a valid params file
    raw = apply_overrides(load_yaml(config), _sets(best.params))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    header = f"# best trial {best.number} of sweep {study_name!r}: value {best.value:.6g}\n"
    Path(out).write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return {"trial": best.number, "value": best.value, "params": best.params}
