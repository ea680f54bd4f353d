"""The ``nft`` command line: one sub-command per entry point.

    nft losses                                          the loss registry and its hyperparameters
    nft check    --config params.yaml [--jobs 2]       validate a study file, its model, data and launcher (exit 1)
    nft data fetch --out benchmarks-data [--sets math500,aime24]   the paper's files from the hub, with their sources
    nft compose  experiments/ablation-eps.yaml --out params.yaml   a preset over the defaults, every key explicit
    nft prepare  --config params.yaml --out data
    nft pretrain --config params.yaml --out models/base [--set pretrain.steps=100 ...]
    nft train    --config params.yaml --arm nft --seed 0 --out runs/nft-s0 [--set train.steps=5 ...]
    nft evaluate --model runs/nft-s0/model --benchmarks synth-medium,math500 --k 4 --out eval.json
                 [--samples answers.jsonl] [--config params.yaml] [--data data] [--limit N]
    nft replay   runs/nft-s0 [--tracking-uri URI]      copy an offline run folder into MLflow
    nft sweep    --config params.yaml --space experiments/sweeps/nft.yaml --trials 20 --study-name S
                 [--storage URL] [--seeds 0,1]           Optuna; every worker runs the same command
    nft sweep best --study-name S --storage URL --config params.yaml --out best.yaml
    nft sweep table --study-name S --storage URL --config params.yaml   the trials as a table, best first

Every command validates the whole params file (and ``--set`` overrides) before any work starts; a bad key is one
error naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys

from nft.dist import PREEMPTED_EXIT  # the exit status of a run stopped after its checkpoint (tests import it here)


def _cmd_losses(args: argparse.Namespace) -> int:
    from nft.algorithms import LOSSES

    for name, spec in sorted(LOSSES.items()):
        defaults = {f.name: f.default for f in dataclasses.fields(spec.params)}
        print(f"{name}: {spec.doc.splitlines()[0] if spec.doc else ''}")
        for key, value in defaults.items():
            print(f"    {key} = {value!r}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from nft.config import load_study
    from nft.pretrain import run_pretrain

    cfg = load_study(args.config, args.set)
    summary = run_pretrain(cfg["data"], cfg["model"], cfg["pretrain"], args.out, progress=not args.quiet)
    print(
        f"pretrain: {summary['parameters']:,} parameters, final loss {summary['final_loss']:.4f}, "
        f"{summary['seconds']:.1f} s -> {args.out}"
    )
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nft.config import ConfigError
    from nft.preflight import problems

    cfg = _load(args)
    raw = cfg["_raw"]
    missing = [k for k in ("arms", "seeds") if k not in raw]
    missing += [f"study.{k}" for k in ("launcher", "eval_launcher") if k not in (raw.get("study") or {})]
    missing += [f"arm_settings.{a}" for a in raw.get("arms") or [] if a not in (raw.get("arm_settings") or {})]
    if missing and Path(args.config).name == "params.yaml":  # the file dvc.yaml reads these keys from
        raise ConfigError(
            f"{args.config}: missing key(s) {missing}, which dvc.yaml reads (`nft compose PRESET "
            f"--out params.yaml` writes every key)"
        )
    found = problems(cfg, processes=args.processes, jobs=args.jobs)
    for line in found:
        print(f"nft check: {line}", file=sys.stderr)
    if found:
        return 1
    plan = cfg["plan"]
    print(f"check: {args.config} is valid: arms {plan.arms}, seeds {plan.seeds}")
    return 0


def _load(args: argparse.Namespace) -> dict:
    """The study file with ``--set`` overrides, validated; its benchmark location applies to this process."""
    from nft.config import load_study
    from nft.data.hub import use_benchmarks

    cfg = load_study(args.config, args.set)
    study = cfg["plan"].study
    use_benchmarks(study.benchmarks_source, study.benchmarks_dir)
    return cfg


def _cmd_data(args: argparse.Namespace) -> int:
    from nft.data.hub import REGISTRY, fetch

    names = [n.strip() for n in args.sets.split(",") if n.strip()] if args.sets else sorted(REGISTRY)
    sources = fetch(names, args.out)
    for rel, src in sorted(sources.items()):
        if src["set"] in names:
            print(
                f"data fetch: {src['repo_id']}@{src['revision'][:12]} -> {args.out}/{rel} ({src['rows']} rows, "
                f"sha256 {src['sha256'][:12]})"
            )
    return 0


def _cmd_compose(args: argparse.Namespace) -> int:
    import yaml

    from nft.config import compose_study
    from nft.io import atomic_write

    text = (
        f"# Composed by `nft compose {args.config}`: that preset over the defaults of nft/*/config.py, every key\n"
        f"# explicit so that DVC tracks it and `dvc exp run -S key=value` can set it. Edit the preset, not this.\n"
        + yaml.safe_dump(compose_study(args.config, args.set), sort_keys=False)
    )
    if args.out:
        atomic_write(args.out, text)
        print(f"compose: {args.config} -> {args.out}")
    else:
        print(text, end="")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    import json

    from nft.config import load_study
    from nft.data.synthetic import build_splits, data_hash, write_jsonl
    from nft.io import replace_dir, staging_dir

    cfg = load_study(args.config, args.set)
    splits = build_splits(cfg["data"])
    tmp = staging_dir(args.out)
    manifest = {}
    for name, items in splits.items():
        write_jsonl(tmp / f"{name}.jsonl", items)
        manifest[name] = {"count": len(items), "hash": data_hash(items)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    replace_dir(tmp, args.out)
    print("prepare: " + ", ".join(f"{k} {v['count']}" for k, v in manifest.items()) + f" -> {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from nft.config import to_dict
    from nft.train.run import run_training

    cfg = _load(args)
    plan = cfg["plan"]
    algo, train = plan.arm(args.arm, cfg["train"])  # the arm's algorithm, with its own loss and train settings
    full = {**to_dict(plan), **{k: to_dict(v) for k, v in cfg.items() if k not in ("_raw", "plan")}}
    final = run_training(
        train,
        algo,
        args.seed,
        args.out,
        study=plan.study.name,
        full_config=full,
        progress=not args.quiet,
        arm=args.arm,
        checkpoints=args.checkpoints,
    )
    if final:  # rank 0 (the other ranks of a launcher return nothing)
        accs = {k: round(v, 4) for k, v in final.items() if k.startswith("val/") and "avg@" in k}
        print(f"train: {args.arm} seed {args.seed} done -> {args.out} {accs}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from nft.evaluate import EvalConfig, run_evaluate

    base = _load(args)["eval"] if args.config else EvalConfig()
    names = ("k", "limit", "seed", "temperature", "top_p", "max_new_tokens")
    changes = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.benchmarks:
        changes["benchmarks"] = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    run_evaluate(
        dataclasses.replace(base, **changes),
        args.model,
        args.out,
        data=args.data,
        samples=args.samples,
        threads=args.threads,
    )
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from nft.tracking_replay import replay

    run_id = replay(args.run_dir, args.tracking_uri, args.experiment)
    print(f"replay: {args.run_dir} -> MLflow run {run_id}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import json

    from nft.sweep import default_storage, run_sweep, sweep_table, write_best

    storage = args.storage or default_storage(args.study_name)
    if args.action == "table":
        print(sweep_table(args.study_name, storage), end="")
        return 0
    if args.action == "best":
        if not args.out:
            raise ValueError("nft sweep best: --out FILE.yaml is required")
        best = write_best(args.study_name, storage, args.config, args.out)
        print(f"sweep best: trial {best['trial']} value {best['value']:.4f} {best['params']} -> {args.out}")
        return 0
    if not args.space:
        raise ValueError("nft sweep: --space FILE is required")
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    summary = run_sweep(
        args.config,
        args.space,
        args.trials,
        args.study_name,
        storage,
        seeds,
        args.set,
        args.out_dir,
        progress=not args.quiet,
        worker=args.worker,
    )
    print("sweep: " + json.dumps(summary, default=str))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="params file (params.yaml or an experiments/ preset)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="sample k answers per problem and grade them: avg@k, pass@k, maj@k")
    p.add_argument("--model", required=True, help="save_pretrained folder")
    p.add_argument("--benchmarks", default=None, help="comma-separated registry names (default: the config's)")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--out", required=True, help="metrics JSON")
    p.add_argument("--samples", default=None, help="optional per-answer JSONL for auditing")
    p.add_argument("--config", default=None, help="params file whose eval section gives the defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data", default="data", help="folder of the prepared synthetic sets")
    p.add_argument("--limit", type=int, default=None, help="first N problems per benchmark")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: eval.threads)")
    p.set_defaults(func=_cmd_evaluate)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="Optuna sweep over hyperparameters (or: sweep best / sweep table)")
    p.add_argument("action", nargs="?", choices=["run", "best", "table"], default="run")
    _common(p)
    p.add_argument("--space", default=None, help="sweep space file (experiments/sweeps/*.yaml)")
    p.add_argument("--trials", type=int, default=10, help="trials in the study, all workers together")
    p.add_argument("--study-name", required=True)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///sweeps/<study>.db)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds per trial")
    p.add_argument("--out-dir", default="sweeps", help="folder of the trials' run folders")
    p.add_argument("--out", default=None, help="sweep best: the params file to write")
    p.add_argument("--worker", default=None, help="this worker's id (seeds its sampler; default host-pid)")
    p.set_defaults(func=_cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nft", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("losses", help="list the registered losses and their default hyperparameters")
    p.set_defaults(func=_cmd_losses)
    p = sub.add_parser("pretrain", help="build the tokenizer and warm-start the tiny base model")
    _common(p)
    p.add_argument("--out", required=True, help="output folder (save_pretrained format)")
    p.set_defaults(func=_cmd_pretrain)
    p = sub.add_parser("check", help="validate a study params file (every section and key) and its backends")
    _common(p)
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="training processes the run will be launched with (default: study.launcher's)",
    )
    p.add_argument("--jobs", type=int, default=1, help="stages run at once (make study's JOBS)")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("data", help="data fetch: write the paper's benchmark and training files from the hub")
    p.add_argument("action", choices=["fetch"])
    p.add_argument("--out", required=True, help="folder to write (study.benchmarks_dir)")
    p.add_argument("--sets", default=None, help="comma-separated registered sets (default: all)")
    p.set_defaults(func=_cmd_data)
    p = sub.add_parser("compose", help="a preset over the defaults, every key explicit (the params.yaml DVC reads)")
    p.add_argument("config", help="study file or preset (experiments/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="file to write (default: print)")
    p.set_defaults(func=_cmd_compose)
    p = sub.add_parser("prepare", help="write the synthetic training pool and held-out sets")
    _common(p)
    p.add_argument("--out", required=True, help="data folder")
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("train", help="online training of one arm with one seed")
    _common(p)
    p.add_argument(
        "--arm",
        required=True,
        help="the arm: a registered algorithm (`nft losses`) or a name in the study's arm_settings",
    )
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
    p.add_argument(
        "--checkpoints",
        default=None,
        help="a folder of its own for the run's checkpoints (default: inside --out); the pipeline keeps them out "
        "of the run folder that DVC caches",
    )
    p.set_defaults(func=_cmd_train)
    _add_evaluate(sub)
    _add_sweep(sub)
    p = sub.add_parser("replay", help="copy a run folder into MLflow (after training offline)")
    p.add_argument("run_dir")
    p.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None)
    p.set_defaults(func=_cmd_replay)
    return parser


#: glibc malloc thresholds of an nft process (bytes): blocks up to 32 MiB come from the heap and up to 64 MiB of
#: free heap is kept, instead of glibc's start (128 KiB, raised only after a large block is freed), under which every
#: activation of a few hundred KiB is a fresh mmap whose pages fault in at each step. The same weights, shorter steps
#: of the embedded default, a little more resident memory (benchmarks/README.md).
MALLOC_THRESHOLDS = {"mmap": 32 << 20, "trim": 64 << 20}


def tune_malloc() -> bool:
    """Set :data:`MALLOC_THRESHOLDS` with ``mallopt`` (glibc only; True if set). ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_`` in the environment take precedence (glibc reads them at start)."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MALLOC_THRESHOLDS["mmap"]) and libc.mallopt(-1, MALLOC_THRESHOLDS["trim"]))
    except (OSError, AttributeError):  # not glibc (macOS, musl): its own allocator stays as it is
        return False


def main(argv: list[str] | None = None) -> int:
    from nft.config import ConfigError
    from nft.dist import adopt_slurm, leave
    from nft.train import Preempted

    args = build_parser().parse_args(argv)
    tune_malloc()
    adopt_slurm()  # under srun: the launcher's variables from SLURM's
    try:
        rc = int(args.func(args) or 0)
        if rc == 0:
            leave()
        return rc
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return PREEMPTED_EXIT
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"nft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # every result and checkpoint write goes through a temporary file or folder: the previous one is intact
        print(
            f"nft {args.command}: error: disk full ({e.strerror}{': ' + str(e.filename) if e.filename else ''}); "
            f"the previous results and checkpoints are intact, free space and rerun to resume",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
