"""A sweep's search space: the space file (its parameters, objective, sampler, pruner and heartbeat settings), the
values a trial suggests from it, and those values as ``--set`` overrides of the study's params file."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from ..config import ConfigError, from_dict, load_yaml


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

    arm: str = "nft"
    """the arm swept: a registered algorithm, or a name in the study's ``arm_settings`` (trained with its settings)."""
    arms: list[str] = field(default_factory=list)
    """several arms: every trial trains each (with the same setting) and the objective is the mean over arms and
    seeds, so one shared setting is chosen for all (as the paper's one lr), never by one arm's score. Empty:
    ``[arm]``."""
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
        self.arms = list(self.arms) or [self.arm]
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


def check_arms(space: SweepSpace, plan, space_path: str | Path) -> None:
    """Every arm of the space is a registered algorithm or a name in the study's ``arm_settings`` (``plan``: the
    study's :class:`nft.config.StudyConfig`)."""
    from ..algorithms import LOSSES

    bad = [a for a in space.arms if a not in LOSSES and a not in plan.arm_settings]
    if bad:
        raise ConfigError(
            f"{space_path}: arms: unknown {bad}; registered algorithms: {sorted(LOSSES)}, "
            f"arm_settings: {sorted(plan.arm_settings)}"
        )


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


def probe(space: SweepSpace) -> dict[str, Any]:
    """One value of every parameter (the first choice, or the low end of a range), to validate the space's
    parameters against the params file before any trial runs."""
    return {
        k: (
            cast("list[Any]", p.choices)[0]
            if p.type == "categorical"
            else p.low
            if p.type == "float"
            else int(cast(float, p.low))
        )
        for k, p in space.params.items()
    }


def grid_points(space: SweepSpace) -> list[dict]:
    """Every combination of the parameters' choices (a ``grid`` space), in the file's order."""
    keys = list(space.params)
    return [
        dict(zip(keys, combo))
        for combo in itertools.product(*(cast("list[Any]", space.params[k].choices) for k in keys))
    ]


def override_sets(values: dict[str, Any]) -> list[str]:
    """``values`` as ``--set key=value`` overrides, each value in YAML flow style."""
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in values.items()
    ]
