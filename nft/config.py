"""Typed configuration: params.yaml -> nested dataclasses, with errors that name the key.

Each entry point has its documented dataclass (one per section of params.yaml); :func:`load_study` validates the
whole file against them. ``--set section.key=value`` overrides any key (values parsed as YAML); unknown keys are an error that
names them, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .flat import flatten


class ConfigError(ValueError):
    """A bad params file or override; the message names the file and key."""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        inner = (get_args(tp) + (Any, Any))[1]
        if dataclasses.is_dataclass(inner):
            return {k: from_dict(inner, v, f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping, checking names and types; ``where`` prefixes error messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown key(s) {keys}; valid keys{' of ' + where if where else ''}: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        msg = str(e)
        if where and not msg.startswith(where):
            # dataclass checks name their own field; prefix the section when they use a bare name
            msg = msg if "." in msg.split(":")[0] else f"{where}.{msg}"
        raise ConfigError(msg) from None


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, sets: list[str] | None) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested mapping (copied)."""
    import copy

    data = copy.deepcopy(data)
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


#: the train stage's launcher when ``study.slurm`` is set: each stage a SLURM job (nft/slurm.py)
SLURM_LAUNCHER = "python -m nft.submit"
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclass
class SlurmSection:
    """``study.slurm``: the resources of each train stage's job (an evaluate stage's job: one task on one node with
    ``gpus_per_node``); unset: stages run on this machine."""

    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node (``--gpus-per-node``); one task per GPU."""
    tasks_per_node: int = 0
    """processes per node; 0: ``gpus_per_node``, or 1 without GPUs."""
    cpus_per_task: int = 1
    time: str = ""
    """``--time`` (``minutes``, ``HH:MM:SS``, ``D-HH:MM:SS``); empty: the partition's default."""
    partition: str = ""
    sbatch: list[str] = field(default_factory=list)
    """further ``sbatch`` options, e.g. ``[--account=abc, --qos=high]``."""
    resubmits: int = 3
    """times a job stopped after its checkpoint (preempted, timed out) is submitted again."""
    logs: str = "slurm-logs"
    """folder of the jobs' logs (``<stage>-<job id>.out``)."""

    def __post_init__(self):
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"study.slurm.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "resubmits"):
            if getattr(self, name) < 0:
                raise ValueError(f"study.slurm.{name}: must be >= 0, got {getattr(self, name)}")
        if self.time and not _SLURM_TIME.match(self.time):
            raise ValueError(f"study.slurm.time: expected minutes, HH:MM:SS or D-HH:MM:SS, got {self.time!r}")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def processes(self) -> int:
        return self.nodes * self.tasks


@dataclass
class StudySection:
    """The ``study`` section: what the study is called and how its training runs are launched."""

    name: str = "nft-study"
    """the MLflow experiment and the reports' title."""
    launcher: str = "nft"
    """the command DVC's train stage runs: ``nft``, or a launcher such as ``deepspeed --num_gpus 8 --module nft.cli``
    (docs/scale-out.md)."""
    benchmarks_dir: str = ""
    """folder of the paper's benchmark and training files, in the layout ``nft data fetch`` writes (empty:
    ``$NFT_BENCHMARKS_DIR``, else ``../shared/benchmarks`` beside the checkout)."""
    benchmarks_source: Literal["local", "hub"] = "local"
    """``local``: read them from ``benchmarks_dir``; ``hub``: download them from the Hugging Face hub when loaded."""
    eval_launcher: str = "nft"
    """the command DVC's evaluate stages run: ``nft`` (here), or ``python -m nft.submit`` with ``slurm``: a SLURM job
    of one task on one node with ``slurm``'s GPUs per node (vLLM's tensor parallelism inside that process)."""
    slurm: SlurmSection | None = None
    """each train stage as a SLURM job with these resources (``launcher: python -m nft.submit``; nft/slurm.py);
    unset: stages run on this machine."""

    def __post_init__(self):
        if (self.slurm is not None) != (self.launcher == SLURM_LAUNCHER):
            raise ValueError(
                f"study.launcher: {SLURM_LAUNCHER!r} exactly when study.slurm is set, got {self.launcher!r}"
            )
        if self.eval_launcher not in ("nft", SLURM_LAUNCHER) or (self.eval_launcher != "nft" and self.slurm is None):
            raise ValueError(
                f"study.eval_launcher: 'nft', or {SLURM_LAUNCHER!r} with study.slurm set, got {self.eval_launcher!r}"
            )


@dataclass
class ArmSettings:
    """The settings of one arm of a study (an ``arm_settings`` entry): the registered algorithm it trains, with its
    own loss hyperparameters (ablations) and, where the arm is about the schedule (e.g. a strictly on-policy pair),
    its own ``train`` settings."""

    algorithm: str
    loss: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    """``train`` keys this arm sets differently (e.g. ``{mini_batch_prompts: 16}``: one optimizer step per rollout
    step); checked against the study's train section when the file is loaded."""

    def __post_init__(self):
        from .algorithms import LOSSES, make_params
        from .train.config import TrainConfig

        if self.algorithm not in LOSSES:
            raise ValueError(f"algorithm: unknown {self.algorithm!r}; registered: {sorted(LOSSES)}")
        names = {f.name for f in dataclasses.fields(TrainConfig)} - {"loss"}
        unknown = sorted(set(self.train) - names)
        if unknown:
            raise ValueError(f"train: unknown key(s) {unknown}; valid: the train section's keys except loss")
        try:
            make_params(self.algorithm, **self.loss)
        except (TypeError, ValueError) as e:
            raise ValueError(f"loss: {e}") from None


#: Built-in arms. The paper's Proposition 4.2 as a pair of arms: NFT with GRPO's question weight (omega = sqrt((1 - r)/r)) and GRPO
#: with NFT's reduction (token sum / 1000) and population std, both with one optimizer step per rollout step (the
#: whole batch: strictly on-policy, R = 1) on the same dynamic-sampling batches. Their gradients are then equal (the
#: clip never acts at R = 1; uniform groups, where NFT's r-hat clip would differ, are filtered), so the claim "on
#: policy, NFT is GRPO" is tested end to end by the pair (``analysis.claims``).
#: (``mini_batch_prompts: 0``: the whole batch; ``analysis.claims`` checks the pair's runs logged one optimizer step
#: per rollout step before it reads them.) Short: 30 rollout steps, half the other arms' 60 (the claim compares the pair
#: with each other, not with the other arms; it saves a sixth of the default study's compute).
_ON_POLICY = {"mini_batch_prompts": 0, "batch_rule": "dynamic", "steps": 30}
ON_POLICY_PAIR = {
    "nft-onpolicy": ArmSettings(algorithm="nft", loss={"omega": "sqrt"}, train=dict(_ON_POLICY)),
    "grpo-onpolicy": ArmSettings(
        algorithm="grpo", loss={"agg": "token-sum", "std": "population"}, train=dict(_ON_POLICY)
    ),
}


@dataclass
class StudyConfig:
    """The top-level keys of a study file: the study, its arm x seed matrix (``dvc.yaml``) and the arms' settings."""

    study: StudySection = field(default_factory=StudySection)
    arms: list[str] = field(
        default_factory=lambda: ["nft", "rft", "grpo", "dapo", "sft", "nft-onpolicy", "grpo-onpolicy"]
    )
    """the arms the study trains over its seeds: registered algorithms (an arm of that name trains that loss with the
    train section's settings) or names in ``arm_settings`` (the embedded default's: the paper's four, the supervised
    control and the strictly on-policy pair)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arm_settings: dict[str, ArmSettings] = field(default_factory=dict)
    """each named arm's algorithm, loss and train overrides; the built-in arms (:data:`ON_POLICY_PAIR`) need no
    entry to be listed in ``arms``."""

    def __post_init__(self):
        from .algorithms import LOSSES

        if not self.arms:
            raise ValueError(f"arms: expected a non-empty list of registered algorithms {sorted(LOSSES)} or named arms")
        self.arm_settings = {
            **self.arm_settings,
            **{a: ON_POLICY_PAIR[a] for a in self.arms if a in ON_POLICY_PAIR and a not in self.arm_settings},
        }
        bad = [a for a in self.arms if a not in LOSSES and a not in self.arm_settings]
        if bad:
            raise ValueError(
                f"arms: unknown {bad}; registered algorithms: {sorted(LOSSES)}, "
                f"arm_settings: {sorted(self.arm_settings)}"
            )
        if not self.seeds:
            raise ValueError("seeds: expected a non-empty list of integers")
        for name, s in self.arm_settings.items():
            official_rft = name == "rft" and s.algorithm == "nft" and s.loss.get("neg_weight") == 0
            if name in LOSSES and s.algorithm != name and not official_rft:
                raise ValueError(
                    f"arm_settings.{name}: an arm named after the registered algorithm {name!r} must train it "
                    f"(algorithm: {name}; rft may also be the official RFT, algorithm: nft with neg_weight: 0), "
                    f"got algorithm: {s.algorithm}"
                )

    def with_every_arm(self) -> StudyConfig:
        """The same study with an ``arm_settings`` entry for every arm (a plain algorithm: ``{algorithm: NAME}``) and
        none for names that are not arms: DVC's train stage reads its arm's entry (``arm_settings.<arm>``), so that
        changing one arm reruns that arm's runs only."""
        settings = {a: self.arm_settings.get(a) or ArmSettings(algorithm=a) for a in self.arms}
        return dataclasses.replace(self, arm_settings=settings)

    def arm(self, name: str, train) -> tuple[str, Any]:
        """``(algorithm, train config)`` of the arm ``name``: its ``arm_settings`` entry's train keys and loss
        overrides merged into ``train`` (the loss overrides on top of any the train section sets for its algorithm);
        an arm without an entry is the registered algorithm of that name with ``train`` as it is."""
        if name not in self.arm_settings:
            return name, train
        s = self.arm_settings[name]
        if s.train:
            train = from_dict(type(train), {**dataclasses.asdict(train), **s.train}, "train")
        if not s.loss:
            return s.algorithm, train
        loss = dict(train.loss)
        loss[s.algorithm] = {**(loss.get(s.algorithm) or {}), **s.loss}
        return s.algorithm, dataclasses.replace(train, loss=loss)


#: the top-level keys :class:`StudyConfig` reads (the rest of a study file are sections)
STUDY_KEYS = tuple(f.name for f in dataclasses.fields(StudyConfig))


def _sections():
    from .data.synthetic import SyntheticConfig
    from .evaluate import EvalConfig
    from .modeling import ModelConfig
    from .pretrain import PretrainConfig
    from .train.config import TrainConfig

    return {
        "data": SyntheticConfig,
        "model": ModelConfig,
        "pretrain": PretrainConfig,
        "train": TrainConfig,
        "eval": EvalConfig,
    }


def load_study(path: str | Path, sets: list[str] | None = None, extra_sections: dict[str, type] | None = None):
    """Load and validate a study file (plus ``--set`` overrides) in one pass. Returns ``{section: dataclass}`` for
    every section, the top-level keys as a :class:`StudyConfig` under ``"plan"`` and the raw mapping under
    ``"_raw"``. Anything unset takes its dataclass default (the one source of defaults). A bad key or value raises
    :class:`ConfigError` naming the file and the key."""
    raw = apply_overrides(load_yaml(path), sets)
    sections = dict(_sections())
    sections.update(extra_sections or {})
    unknown = sorted(set(raw) - set(sections) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known: {sorted(set(sections) | set(STUDY_KEYS))}")
    out: dict[str, Any] = {"_raw": raw}
    try:
        out["plan"] = from_dict(StudyConfig, {k: raw[k] for k in STUDY_KEYS if k in raw})
        for name, cls in sections.items():
            out[name] = from_dict(cls, raw.get(name), name)
        for name, s in out["plan"].arm_settings.items():  # an arm's own train settings, against this train section
            if s.train:
                try:
                    out["plan"].arm(name, out["train"])
                except ConfigError as e:
                    raise ConfigError(f"arm_settings.{name}.{e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return out


def compose_study(path: str | Path, sets: list[str] | None = None) -> dict:
    """The study file ``path`` with every default filled in: what ``nft compose`` writes as ``params.yaml``, so that
    DVC tracks (and ``dvc exp run -S`` can set) every key. A preset states only what differs from the defaults."""
    cfg = load_study(path, sets)
    out = to_dict(cfg["plan"].with_every_arm())
    out.update({name: to_dict(v) for name, v in cfg.items() if name not in ("_raw", "plan")})
    return out


__all__ = [
    "ConfigError",
    "compose_study",
    "StudyConfig",
    "StudySection",
    "ArmSettings",
    "STUDY_KEYS",
    "from_dict",
    "to_dict",
    "flatten",
    "apply_overrides",
    "load_yaml",
    "load_study",
]
