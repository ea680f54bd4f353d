"""Did the study reproduce the recorded one? Record a finished study as a reference, check a later one against it.

    python -m analysis.reproduce record --out experiments/reference/embedded-default.GenuineIntel.json  # after `make study`
    python -m analysis.reproduce check --reference experiments/reference/embedded-default.json

References are kept per CPU vendor (``<study>.<vendor>.json``, :func:`nft.cpu_vendor`): MKL's matrix products take
other code paths on AMD's and Intel's processors, so the tiny base model's 2,700 pretraining steps, and everything
trained from it, end elsewhere. ``check --reference DIR/<study>.json`` reads ``DIR/<study>.<this machine's
vendor>.json``.

``record`` reads the finished study in the workspace (run folders, ``evals/``, ``reports/metrics.json``, the base
model) and writes, for every run, the sha256 of its weights and its final headline metric per benchmark; for every
arm its mean and std over seeds; for every claim its difference, interval and verdict; with the commit and versions
that produced them. Nothing in it is typed by hand.

``check`` compares the study in the workspace with a reference (recorded with the same ``params.yaml``, else it
stops: exit 2) and exits 1 when

- anything the reference has is missing: a run folder, its weights or its ``metrics.json``, its evaluation file,
  an arm, or (unless ``--no-mlflow``) the run in the MLflow experiment of the study;
- MLflow does not hold what the files hold: every history value of every run and every final evaluation number
  (``final/<benchmark>/<metric>``) must be there and equal;
- an arm's mean moved by more than ``--tol`` points (default 1.0: above any seed spread of the embedded default).

It always reports how many runs reproduced **bit for bit** (same weights sha256) and any claim whose verdict
changed; ``--exact`` makes a weights difference a failure too (one CPU thread per process repeats bit for bit on one
machine; another CPU or library version need not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

from nft import cpu_vendor
from nft.train.checkpoint import file_sha256

BASE = "base"
WEIGHTS = "model.safetensors"


def _final(eval_file: Path, metric_for: dict[str, str]) -> dict[str, float]:
    from nft.evaluate import eval_benchmarks

    benches = eval_benchmarks(json.loads(eval_file.read_text()))
    return {b: 100.0 * float(benches[b][m]) for b, m in metric_for.items() if b in benches and m in benches[b]}


def snapshot(root: Path) -> tuple[dict, dict[str, str]]:
    """The finished study under ``root`` as a reference dict, and what is missing from it: {run: message} for run
    folders (and the base model) without weights, metrics.json or evaluation; {"": message} without a report."""
    missing: dict[str, str] = {}
    metrics_file = root / "reports" / "metrics.json"
    if not metrics_file.is_file():
        return {}, {"": f"{metrics_file}: not found (run the analyze stage: `dvc repro`)"}
    numbers = json.loads(metrics_file.read_text())
    metric_for = numbers["metric_per_benchmark"]
    runs: dict[str, dict] = {}
    folders = sorted(p for p in (root / "runs").iterdir() if p.is_dir()) if (root / "runs").is_dir() else []
    for run_dir, weights in [(p, p / "model" / WEIGHTS) for p in folders] + [(None, root / "models/base" / WEIGHTS)]:
        name = run_dir.name if run_dir is not None else BASE
        eval_file = root / "evals" / f"{name}.json"
        need = [weights, eval_file] + ([run_dir / "metrics.json"] if run_dir is not None else [])
        gone = [str(p.relative_to(root)) for p in need if not p.is_file()]
        if gone:
            missing[name] = f"run {name}: missing {', '.join(gone)}"
            continue
        runs[name] = {"weights_sha256": file_sha256(weights), "final": _final(eval_file, metric_for)}
    arms = {
        v: {k: m[k] for k in ("mean", "std", "seeds", "gain_over_base") if k in m} for v, m in numbers["arms"].items()
    }
    claims = {
        c: {k: m[k] for k in ("diff", "ci_low", "ci_high", "verdict")} for c, m in numbers.get("claims", {}).items()
    }
    return {
        "metric": numbers["metric"],
        "metric_per_benchmark": metric_for,
        "runs": runs,
        "arms": arms,
        "claims": claims,
    }, missing


def _params(path: Path) -> dict | None:
    import yaml

    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


#: study keys left out of :func:`params_digest`: where evaluation runs (``nft`` here, or a one-process SLURM job)
#: does not change what it computes
NOT_RESULTS = ("eval_launcher",)


def params_digest(path: Path) -> str | None:
    """sha256 of the study's parameters as parsed (comments and layout left out, and :data:`NOT_RESULTS`); None
    without the file."""
    params = _params(path)
    if params is None:
        return None
    if isinstance(params.get("study"), dict):
        params = {**params, "study": {k: v for k, v in params["study"].items() if k not in NOT_RESULTS}}
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _provenance(root: Path) -> dict:
    import torch
    import transformers

    from nft.tracking_store import git_state

    study = (_params(root / "params.yaml") or {}).get("study") or {}
    git = git_state(root)
    return {
        "study": study.get("name"),
        "params_sha256": params_digest(root / "params.yaml"),
        "commit": git.get("mlflow.source.git.commit"),
        "dirty": git.get("nft.git_dirty") == "True",
        "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_vendor": cpu_vendor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def mlflow_gaps(root: Path, experiment: str, tracking_uri: str, names: list[str]) -> list[str]:
    """What the run folders and evaluation files hold that the MLflow experiment does not (or holds otherwise)."""
    from .load import _final_rows, load_mlflow, load_runs

    try:
        files, _, _ = load_runs(root / "runs")
        logged, _, problems = load_mlflow(experiment, tracking_uri)
    except ValueError as e:
        return [f"MLflow: {e}"]
    gaps = [f"MLflow: {p}" for p in problems if "status" in p]
    have = set(logged.run)
    gaps += [f"MLflow: run {n} not in experiment {experiment!r}" for n in names if n != BASE and n not in have]
    key = ["run", "step", "metric"]
    m = files[files.run.isin(have)].merge(logged, on=key, how="left", suffixes=("", "_mlflow"))
    lost = m[m.value_mlflow.isna() & m.value.notna()]
    wrong = m[m.value.notna() & m.value_mlflow.notna() & (m.value_mlflow != m.value)]
    for what, rows in (("missing from", lost), ("different in", wrong)):
        for run, g in rows.groupby("run"):
            gaps.append(
                f"MLflow: run {run}: {len(g)} history values {what} MLflow (e.g. {g.metric.iloc[0]} at step "
                f"{int(g.step.iloc[0])})"
            )
    finals = logged[logged.metric.str.startswith("final/")].groupby(["run", "metric"]).value.last()
    for name in sorted(have):
        eval_file = root / "evals" / f"{name}.json"
        if not eval_file.is_file():
            continue
        lost, wrong = [], []
        for *_, bench, k, v in _final_rows(
            {"run": name, "algorithm": "", "arm": "", "seed": 0}, json.loads(eval_file.read_text()), {}
        ):
            got = finals.get((name, f"final/{bench}/{k}"))
            if got is None:
                lost.append(f"final/{bench}/{k}")
            elif float(got) != v:
                wrong.append(f"final/{bench}/{k} ({got} against {v})")
        for what, keys in (("missing from", lost), ("different in", wrong)):
            if keys:
                gaps.append(f"MLflow: run {name}: {len(keys)} final evaluation numbers {what} MLflow (e.g. {keys[0]})")
    return gaps


def compare(
    ref: dict, cur: dict, tol: float, exact: bool, missing: dict[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """(failures, notes) of the current snapshot against the reference (``missing``: the snapshot's incomplete runs,
    already reported)."""
    fail, notes = [], []
    same, differ = [], []
    for name, r in sorted(ref["runs"].items()):
        c = cur["runs"].get(name)
        if c is None:
            continue  # reported as missing by the snapshot or below
        (same if c["weights_sha256"] == r["weights_sha256"] else differ).append(name)
    gone = sorted(set(ref["runs"]) - set(cur["runs"]) - set(missing or {}))
    fail += [f"run {n}: in the reference, not in this study" for n in gone]
    extra = sorted(set(cur["runs"]) - set(ref["runs"]))
    if extra:
        notes.append(f"runs not in the reference (not compared): {', '.join(extra)}")
    notes.append(
        f"bit for bit: {len(same)} of {len(ref['runs'])} runs have the reference's weights"
        + (f"; different weights: {', '.join(differ)}" if differ else "")
    )
    if exact and differ:
        fail.append(f"--exact: {len(differ)} runs' weights differ from the reference ({', '.join(differ)})")
    for name in differ:
        d = {b: cur["runs"][name]["final"].get(b, float("nan")) - v for b, v in ref["runs"][name]["final"].items()}
        notes.append(f"run {name}: final {ref['metric']} moved " + ", ".join(f"{b} {x:+.1f}" for b, x in d.items()))
    for v, r in sorted(ref["arms"].items()):
        c = cur["arms"].get(v)
        if c is None:
            fail.append(f"arm {v}: in the reference, not in this study")
            continue
        delta = c["mean"] - r["mean"]
        line = f"arm {v}: mean {c['mean']:.2f} against the reference's {r['mean']:.2f} ({delta:+.2f} points)"
        if abs(delta) > tol:
            fail.append(line + f": more than --tol {tol}")
        elif delta:
            notes.append(line)
    for cid, r in sorted(ref["claims"].items()):
        c = cur["claims"].get(cid)
        if c is None:
            notes.append(f"claim {cid}: not evaluated in this study")
        elif c["verdict"] != r["verdict"]:
            notes.append(
                f"claim {cid}: verdict {c['verdict']} ({c['diff']:+.2f} [{c['ci_low']:+.2f}, "
                f"{c['ci_high']:+.2f}]), the reference's {r['verdict']} ({r['diff']:+.2f})"
            )
    return fail, notes


def this_vendors(path: Path) -> Path:
    """``path`` if it exists, else the reference of this machine's CPU vendor beside it (``<stem>.<vendor>.json``)."""
    return path if path.exists() else path.with_name(f"{path.stem}.{cpu_vendor()}{path.suffix}")


def record(root: Path, out: Path) -> int:
    """``record``: the finished study under ``root`` written to ``out`` as a reference."""
    snap, missing = snapshot(root)
    if missing:
        print(
            "reproduce record: the study is not complete; nothing written:\n  " + "\n  ".join(missing.values()),
            file=sys.stderr,
        )
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"provenance": _provenance(root), **snap}, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)
    print(f"reproduce record: {len(snap['runs'])} runs, {len(snap['arms'])} arms -> {out}")
    return 0


def check(root: Path, args: argparse.Namespace) -> int:
    """``check``: the study under ``root`` against the reference ``args.reference`` (of this machine's vendor)."""
    ref_path = this_vendors(Path(args.reference))
    if not ref_path.exists():
        recorded = sorted(p.name for p in ref_path.parent.glob(f"{Path(args.reference).stem}.*.json"))
        print(
            f"reproduce check: {ref_path}: no study recorded on a {cpu_vendor()} processor (recorded: "
            f"{', '.join(recorded) or 'none'}); record one with `python -m analysis.reproduce record --out "
            f"{ref_path}` after `make study`",
            file=sys.stderr,
        )
        return 2
    try:
        ref = json.loads(ref_path.read_text())
        for key in ("runs", "arms", "claims", "provenance"):
            ref[key]  # noqa: B018
    except (OSError, ValueError, KeyError) as e:
        print(f"reproduce check: {ref_path}: not a reference ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    digest = params_digest(root / "params.yaml")
    if ref["provenance"].get("params_sha256") != digest:
        print(
            f"reproduce check: {root / 'params.yaml'} is not the study {ref_path} recorded (parameters' sha256 "
            f"{str(digest)[:12]} against {str(ref['provenance'].get('params_sha256'))[:12]}): nothing to compare",
            file=sys.stderr,
        )
        return 2
    cur, missing = snapshot(root)
    if not cur:
        print(f"reproduce check: {missing['']}", file=sys.stderr)
        return 1
    fail, notes = compare(ref, cur, args.tol, args.exact, missing)
    fail = list(missing.values()) + fail
    if not args.no_mlflow:
        # the study's store: the given URI, else $MLFLOW_TRACKING_URI, else the workspace's mlflow.db (the default of
        # a run started there)
        uri = (
            args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"
        )
        fail += mlflow_gaps(root, ref["provenance"].get("study") or "", uri, sorted(cur["runs"]))
    prov = ref["provenance"]
    print(
        f"reproduce check against {ref_path} (recorded {prov.get('recorded')} at {str(prov.get('commit'))[:10]} on "
        f"{prov.get('processor')}, torch {prov.get('torch')}):"
    )
    for line in notes:
        print(f"  {line}")
    if fail:
        print(f"FAILED ({len(fail)}):", file=sys.stderr)
        for line in fail:
            print(f"  {line}", file=sys.stderr)
        return 1
    held = "MLflow not checked" if args.no_mlflow else "MLflow holds every run's numbers"
    print(f"  OK: nothing missing, {held}, every arm's mean within {args.tol} points of the reference")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.reproduce", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="write the finished study in the workspace as a reference")
    rec.add_argument("--out", required=True)
    chk = sub.add_parser("check", help="compare the study in the workspace with a reference")
    chk.add_argument("--reference", required=True)
    chk.add_argument("--tol", type=float, default=1.0, help="largest change of an arm's mean, in points")
    chk.add_argument("--exact", action="store_true", help="fail when any run's weights differ")
    chk.add_argument("--no-mlflow", action="store_true", help="do not check the MLflow experiment")
    chk.add_argument(
        "--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else ROOT/mlflow.db)"
    )
    for p in (rec, chk):
        p.add_argument("--root", default=".", help="the study's workspace (repository root)")
    args = ap.parse_args(argv)
    root = Path(args.root)

    return record(root, Path(args.out)) if args.cmd == "record" else check(root, args)


if __name__ == "__main__":
    sys.exit(main())
