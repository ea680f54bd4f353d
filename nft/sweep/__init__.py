"""Optuna sweeps over an arm's hyperparameters, on one machine or many sharing one storage.

    nft sweep --config params.yaml --space experiments/sweeps/nft.yaml --trials 20 --study-name nft-lr \\
              [--storage sqlite:///sweeps/nft-lr.db | postgresql://user@host/db] [--seeds 0,1]
    nft sweep best --study-name nft-lr --storage URL --config params.yaml --out best.yaml

Every worker runs the same command against one storage, with Optuna's own machinery only: ``study.optimize`` on an
``RDBStorage`` with heartbeats, so that a worker that dies (kill -9, a lost machine) leaves a trial that the other
workers mark failed once its heartbeat is stale (``heartbeat.grace`` seconds) and retry
(``RetryHeartbeatStaleTrialCallback``: the copy records the trial it retries); ``MaxTrialsCallback`` bounds the study at
``--trials`` finished (complete or pruned) trials; each worker's TPE sampler has its own seed, derived from the space's
``sampler_seed`` and the worker's id (recorded on its trials), so workers do not suggest the same points. A ``grid``
space runs each point once (Optuna's ``GridSampler``). A trial trains one short run per arm and seed
(cleanrl's tuner: seeds in turn) and reports the validation metric after every validation to the pruner; the
objective is the mean of the last validations. A trial that crashes is marked failed with its error and the sweep
goes on.

The space file::

    arm: nft                       # the arm swept (or arms: [nft, grpo]: the objective is their mean)
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

The package: ``space`` (the space file, suggested values, overrides), ``study`` (Optuna storage, samplers, pruners,
the study shared by the workers, the finished-trials bound), ``objective`` (one trial's runs), ``runner``
(:func:`run_sweep`: one worker) and ``results`` (``sweep table``, ``sweep best``).
"""

from .objective import Objective, Reporter
from .results import sweep_table, write_best
from .runner import run_sweep
from .space import ParamSpec, SweepSpace, grid_points, load_space, override_sets, probe, suggest
from .study import FinishedTrials, create_or_load, default_storage, max_wait, worker_seed

__all__ = [
    "FinishedTrials",
    "Objective",
    "ParamSpec",
    "Reporter",
    "SweepSpace",
    "create_or_load",
    "default_storage",
    "grid_points",
    "load_space",
    "max_wait",
    "override_sets",
    "probe",
    "run_sweep",
    "suggest",
    "sweep_table",
    "worker_seed",
    "write_best",
]
