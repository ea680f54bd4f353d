"""A training run's set-up: check the configuration and backends, load the data, prepare the run folder (or find it
finished), load the policy into its engine (resuming from the last usable checkpoint), start tracking, make the
sampler. Everything a run's steps share is a :class:`Run`."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from transformers import AutoTokenizer

from .. import cpu_isa
from ..algorithms import batch_rule, get_spec, make_params
from ..data.benchmarks import load_benchmark
from ..data.prompts import within_prompt_tokens
from ..dist import Dist, launched_world_size
from ..flat import flatten
from ..modeling import pad_id
from ..reward import GraderPool
from ..rollout import Sampler, make_sampler
from ..tracking import MLflowTracker, NullTracker, Tracker
from ..tracking_store import dvc_experiment, git_state, study_run
from .checkpoint import fingerprint, has_checkpoint, restore_checkpoint, truncate_history, usable_checkpoint
from .config import TrainConfig
from .ds_config import load_policy_for, model_config, resolve_deepspeed_config, resume_config
from .engines import DeepSpeedEngine, Engine, TorchEngine, init_distributed
from .seeds import Cursor, seed_block
from .validation import validate


def check_backends(cfg: TrainConfig, world: int | None = None) -> dict | None:
    """Misconfigured engines fail here, before any model loads: vLLM missing or asking for more devices than a
    process has, DeepSpeed missing, a DeepSpeed config that contradicts the batch sizes. Returns the resolved
    DeepSpeed config (``None`` for the torch engine)."""
    world = world or launched_world_size()
    if cfg.reference_dp and cfg.normalizer == "micro_batch" and world != cfg.reference_dp and Dist().is_main:
        print(
            f"train: reference_dp {cfg.reference_dp} on {world} process(es) with normalizer micro_batch: the sum of "
            f"micro-batch means matches the official gradient only as far as the micro-batches per process scale "
            f"with its rows (exact for token-sum losses, NFT and RFT)",
            file=sys.stderr,
        )
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
    ds = resolve_deepspeed_config(cfg.deepspeed_config, cfg, world, model_config(cfg.model))
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(
            "train.engine: deepspeed is not installed here (pip install -e '.[deepspeed]'), or set train.engine: torch"
        )
    return ds


#: train settings that say where results are logged, not what they are: left out of the run's fingerprint
TRACKING_KEYS = ("experiment", "tracking_uri", "tracking")


@dataclass
class Run:
    """Everything a run's steps share, set up by :func:`_setup`."""

    cfg: TrainConfig
    algo: str
    """the registered algorithm (loss) the run trains"""
    arm: str
    """the study's name of the run's training configuration"""
    seed: int
    run_dir: Path
    ckpt_dir: Path
    """where the run's checkpoints are: the run folder, or a folder of their own (``nft train --checkpoints``)"""
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
        """Every process validates its share of each set; all return the same metrics."""
        return validate(self.sampler, self.tokenizer, self.val_sets, self.pools, self.cfg, self.seed, self.dist)


def _afresh_if_other(folder: Path, fp: str, what: str) -> None:
    fp_file = folder / "fingerprint"
    if folder.is_dir() and fp_file.is_file() and fp_file.read_text().strip() != fp:
        print(
            f"train: {folder} holds {what} of another configuration, base model or data; starting afresh",
            file=sys.stderr,
        )
        shutil.rmtree(folder)


def _prepare_folder(run_dir: Path, fp: str, dist: Dist, ckpt_dir: Path) -> dict | None:
    """Start afresh on a run folder (or checkpoint folder) of another configuration; return the final metrics of a
    finished run (``{}`` on ranks other than 0), else ``None``."""
    fp_file, final_path = run_dir / "fingerprint", run_dir / "metrics.json"
    if dist.is_main:
        _afresh_if_other(run_dir, fp, "a run")
        if ckpt_dir != run_dir:
            _afresh_if_other(ckpt_dir, fp, "checkpoints")
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            (ckpt_dir / "fingerprint").write_text(fp)
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
    """The run's tracker: nested under the study's run (``nft.tracking.study_run``), continued on resume."""
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


@dataclass
class _Inputs:
    """What a run reads, checked before any model loads."""

    params: Any
    rule: str
    train_set: Any
    val_sets: dict
    ds_config: dict | None
    resolved: dict


def _inputs(cfg: TrainConfig, algo: str, seed: int) -> _Inputs:
    params = make_params(algo, **dict(cfg.loss.get(algo, {}) or {}))  # unknown algorithm: error before any work
    spec = get_spec(algo)
    rule = batch_rule(algo, cfg.batch_rule)
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"train.model: {cfg.model}: base model folder not found")
    train_set = load_benchmark(cfg.train_set, cfg.data)
    if cfg.max_prompt_tokens:
        tok = AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
        train_set = within_prompt_tokens(train_set, tok, cfg.max_prompt_tokens)
        if not train_set:
            raise ValueError(f"train.max_prompt_tokens: {cfg.max_prompt_tokens} leaves no question of {cfg.train_set}")
    if spec.reference and not all(getattr(q, "solution", "") for q in train_set):
        raise ValueError(
            f"train.train_set: {algo} trains on worked solutions, and {cfg.train_set!r} has none "
            f"(the synthetic pool has them)"
        )
    val_sets = {name: load_benchmark(name, cfg.data) for name in cfg.val_benchmarks}
    ds_config = check_backends(cfg)
    resolved: dict[str, Any] = {
        "algorithm": algo,
        "seed": seed,
        "batch_rule": rule,
        "loss": asdict(params),
        "train": asdict(cfg),
    }
    return _Inputs(params, rule, train_set, val_sets, ds_config, resolved)


@dataclass
class _Loaded:
    engine: Engine
    tokenizer: Any
    source: str  # the weights this process started from
    cursor: Cursor
    start_step: int
    resume: bool


def _load(
    cfg: TrainConfig, run_dir: Path, ckpt_dir: Path, dist: Dist, ds_config: dict | None, n_train: int, order_seed: int
) -> _Loaded:
    """The policy in its engine and the data cursor, from the last usable checkpoint if there is one."""
    # ranks on one machine share its cores: more threads than that only contend (and OpenMP spins)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
    torch.set_num_threads(max(1, min(cfg.threads, (os.cpu_count() or 1) // max(per_node, 1))))
    # rank 0 checks the checkpoints (and sets damaged ones aside); every rank takes its answer
    had = has_checkpoint(ckpt_dir) if dist.is_main else False
    ckpt = dist.broadcast(str(usable_checkpoint(ckpt_dir) or "") if dist.is_main else None) or None
    if had and ckpt is None and dist.is_main:
        print(f"train: {ckpt_dir} has no usable checkpoint; starting the run afresh", file=sys.stderr)
    resume = ckpt is not None
    if resume and ds_config is not None:  # written by another number of processes: its universal conversion
        ds_config = resume_config(Path(cast(str, ckpt)), ds_config, dist.world)
    source = str(Path(cast(str, ckpt)) / "model") if resume else cfg.model
    model, tokenizer = load_policy_for(source, ds_config)
    if ds_config is None and torch.cuda.is_available():
        model = model.cuda()  # DeepSpeed places its own
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    engine = TorchEngine(model, cfg) if ds_config is None else DeepSpeedEngine(model, cfg, ds_config)
    cursor, start_step = Cursor(n_train, order_seed), 0
    if resume:
        assert ckpt is not None  # resume means a checkpoint was found
        cursor, start_step = restore_checkpoint(Path(ckpt), engine, n_train, order_seed)
        if dist.is_main:
            truncate_history(run_dir / "history.jsonl", start_step)
    elif dist.is_main:
        (run_dir / "history.jsonl").unlink(missing_ok=True)
    return _Loaded(engine, tokenizer, source, cursor, start_step, resume)


def _tags(cfg: TrainConfig, algo: str, arm: str, seed: int, study: str, ins: _Inputs, dist: Dist) -> dict:
    return {
        "algorithm": algo,
        "arm": arm,
        "seed": str(seed),
        "study": study,
        "dvc.exp_name": dvc_experiment(),
        "mlflow.source.name": "nft train",
        "mlflow.source.type": "LOCAL",
        **git_state(),
        "data_hash": ins.train_set.hash,
        "batch_rule": ins.rule,
        "engine": cfg.engine,
        "sampler": cfg.sampler,
        "processes": str(dist.world),
        "cpu_isa": cpu_isa(),
    }


def _track(
    cfg: TrainConfig,
    run_dir: Path,
    name: str,
    study: str,
    ins: _Inputs,
    seeds: dict,
    tags: dict,
    resume: bool,
    dist: Dist,
    tracker: Tracker | None,
    full_config: dict | None,
) -> Tracker:
    """Write the run's config.yaml and tags.json (rank 0), start or continue its tracker, log params once."""
    if dist.is_main:
        (run_dir / "config.yaml").write_text(
            yaml.safe_dump({**(full_config or {}), "resolved": ins.resolved}, sort_keys=False)
        )
    tracker = _make_tracker(cfg, run_dir, name, resume, dist, tracker, cfg.experiment or study, tags)
    if dist.is_main:
        (run_dir / "tags.json").write_text(json.dumps(tags, indent=2))
    if not resume:
        tracker.log_params({**flatten(ins.resolved), **seeds})
        tracker.set_tags(tags)
        if isinstance(tracker, MLflowTracker):
            tracker.log_dataset(
                ins.train_set.name,
                ins.train_set.hash,
                str(Path(cfg.data).resolve() / f"{cfg.train_set}.jsonl") if cfg.train_set == "train" else cfg.train_set,
            )
            tracker.log_artifact(run_dir / "config.yaml")
    return tracker


def setup(
    cfg: TrainConfig,
    algo: str,
    seed: int,
    run_dir: Path,
    *,
    study: str,
    full_config: dict | None,
    tracker: Tracker | None,
    arm: str,
    checkpoints: Path | None = None,
) -> Run | dict:
    """Validate, then set up the run (or return the final metrics of a finished one). ``checkpoints``: a folder of
    their own for the run's checkpoints (default: the run folder)."""
    ins = _inputs(cfg, algo, seed)
    results_of = {**ins.resolved, "train": {k: v for k, v in ins.resolved["train"].items() if k not in TRACKING_KEYS}}
    dist = init_distributed(cfg.engine)
    ckpt_dir = checkpoints or run_dir
    done = _prepare_folder(run_dir, fingerprint(results_of, ins.train_set, ins.val_sets, cfg.model), dist, ckpt_dir)
    if done is not None:
        return done
    seeds = seed_block(seed)
    got = _load(cfg, run_dir, ckpt_dir, dist, ins.ds_config, len(ins.train_set), seeds["seed/data_order"])
    tags = _tags(cfg, algo, arm, seed, study, ins, dist)
    tracker = _track(cfg, run_dir, f"{arm}-s{seed}", study, ins, seeds, tags, got.resume, dist, tracker, full_config)
    engine = got.engine
    sampler = make_sampler(
        cfg.sampler,
        got.source,
        got.tokenizer,
        seed=seed,
        vllm=cfg.vllm,
        weights=engine.rollout_weights(),
        dtype=engine.dtype,
        memory_mb=cfg.sample_memory_mb,
        stops=cfg.stop_tokens,
    )
    graders = {cfg.grader_per_set.get(name, cfg.grader) for name in [cfg.train_set, *cfg.val_benchmarks]}
    return Run(
        cfg,
        algo,
        arm,
        seed,
        run_dir,
        ckpt_dir,
        dist,
        engine,
        got.tokenizer,
        sampler,
        tracker,
        {g: GraderPool(cfg.grader_workers, g) for g in sorted(graders)},
        got.cursor,
        ins.train_set,
        ins.val_sets,
        ins.rule,
        dict(cfg.loss.get(algo, {}) or {}),
        # DAPO's overlong penalty shapes the reward; losses that need 0/1 rewards (NFT, RFT) never get it
        not getattr(ins.params, "binary_rewards", False),
        pad_id(got.tokenizer),
        got.start_step,
    )
