"""Finished runs -> tidy pandas frames, from run folders or from MLflow (same columns, same numbers).

- ``history``: one row per (run, step, metric): ``run, algorithm, arm, seed, step, metric, value``;
- ``final``: one row per (run, benchmark, metric) of the final evaluation: ``run, algorithm, arm, seed, benchmark,
  metric, value`` (from ``evals/<run>.json`` when present, else the run's last validation), plus the base model's
  rows (arm ``base``) from ``evals/base.json`` when the pipeline evaluated it.

``arm`` is the run's arm (``nft-omega-sqrt``, a name in the study's ``arm_settings``; the algorithm itself
otherwise; for runs without that tag, the algorithm plus its loss overrides, ``nft[omega=sqrt]``), so ablation runs
of one algorithm stay apart; ``algorithm`` is the registered loss the run trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from nft.evaluate import eval_benchmarks

HISTORY_COLUMNS = ["run", "algorithm", "arm", "seed", "step", "metric", "value"]
FINAL_COLUMNS = ["run", "algorithm", "arm", "seed", "benchmark", "metric", "value"]


def arm_name(algo: str, overrides: dict | None) -> str:
    """The arm of a run without an ``arm`` tag: its algorithm, with its loss overrides in brackets."""
    if not overrides:
        return algo
    return algo + "[" + ",".join(f"{k}={overrides[k]}" for k in sorted(overrides)) + "]"


def _run_identity(run_dir: Path) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    res = cfg.get("resolved", {})
    algo = res.get("algorithm") or run_dir.name.rsplit("-s", 1)[0]
    overrides = ((res.get("train") or {}).get("loss") or {}).get(algo) or {}
    tags = json.loads((run_dir / "tags.json").read_text()) if (run_dir / "tags.json").is_file() else {}
    return {
        "run": run_dir.name,
        "algorithm": algo,
        "arm": tags.get("arm") or arm_name(algo, overrides),
        "seed": int(res.get("seed", run_dir.name.rsplit("-s", 1)[-1] if "-s" in run_dir.name else 0)),
    }


def _history_rows(ident: dict, rows: list[dict]) -> list[tuple]:
    out = []
    for r in rows:
        step = int(r["step"])
        for k, v in r.items():
            if k == "step" or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            out.append((ident["run"], ident["algorithm"], ident["arm"], ident["seed"], step, k, float(v)))
    return out


def _final_rows(ident: dict, eval_json: dict | None, last_val: dict) -> list[tuple]:
    out = []
    if eval_json:
        for bench, metrics in eval_benchmarks(eval_json).items():
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append((ident["run"], ident["algorithm"], ident["arm"], ident["seed"], bench, k, float(v)))
    else:
        for k, v in last_val.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "val" and parts[1] != "mean":
                out.append(
                    (ident["run"], ident["algorithm"], ident["arm"], ident["seed"], parts[1], parts[2], float(v))
                )
    return out


def _add_run(ident: dict, rows: list[dict], evals_dir, hist: list, final: list) -> None:
    """Append one run's history rows and its final-evaluation rows (``evals/<run>.json`` or the last validation)."""
    hist += _history_rows(ident, rows)
    ev = None
    if evals_dir is not None and (Path(evals_dir) / f"{ident['run']}.json").is_file():
        ev = json.loads((Path(evals_dir) / f"{ident['run']}.json").read_text())
    last_val = {}
    for r in rows:
        last_val.update({k: v for k, v in r.items() if k.startswith("val/")})
    final += _final_rows(ident, ev, last_val)


#: the base model's row: ``evals/base.json`` (the pipeline's ``evaluate-base`` stage), one evaluation
BASE = "base"


def _add_base(evals_dir, final: list) -> None:
    """The base model's final-evaluation rows (arm ``base``, seed 0) when ``evals/base.json`` exists."""
    path = Path(evals_dir) / f"{BASE}.json" if evals_dir is not None else None
    if path is not None and path.is_file():
        final += _final_rows({"run": BASE, "algorithm": BASE, "arm": BASE, "seed": 0}, json.loads(path.read_text()), {})


def load_runs(runs_dir: str | Path, evals_dir: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """Read every run folder under ``runs_dir``. Returns ``(history, final, problems)``; ``problems`` lists what was
    odd (unfinished runs, missing files) for the summary, without failing."""
    runs_dir = Path(runs_dir)
    hist, final, problems = [], [], []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []:
        if not (run_dir / "config.yaml").is_file() or not (run_dir / "history.jsonl").is_file():
            problems.append(f"{run_dir.name}: not a run folder (config.yaml or history.jsonl missing); skipped")
            continue
        ident = _run_identity(run_dir)
        rows = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines() if x.strip()]
        if not (run_dir / "metrics.json").is_file():
            problems.append(
                f"{run_dir.name}: unfinished (no metrics.json); its curve is included up to step "
                f"{rows[-1]['step'] if rows else 0}"
            )
        _add_run(ident, rows, evals_dir, hist, final)
    _add_base(evals_dir, final)
    return (pd.DataFrame(hist, columns=HISTORY_COLUMNS), pd.DataFrame(final, columns=FINAL_COLUMNS), problems)


def _latest_per_arm(runs: list, problems: list[str]) -> list:
    """One run per (arm, seed): the latest finished one (else the latest); the others are named in
    ``problems`` (reruns, replays, DVC experiments logging into the same study)."""
    by_key: dict[tuple, list] = {}
    for r in runs:
        t = r.data.tags
        by_key.setdefault((t.get("arm") or t["algorithm"], t.get("seed")), []).append(r)
    keep = []
    for key, group in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        group.sort(key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0), reverse=True)
        keep.append(group[0])
        for r in group[1:]:
            problems.append(
                f"MLflow run {r.info.run_id} ({r.info.run_name}, {r.info.status}) skipped: a later "
                f"finished run of {key[0]} seed {key[1]} is used"
            )
    return keep


def load_mlflow(
    experiment: str, tracking_uri: str = "", evals_dir: str | Path | None = None, dvc_exp: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """The same frames from an MLflow experiment (metric histories; ``_at_`` in names maps back to ``@``): one run
    per (arm, seed), the latest finished; ``dvc_exp`` keeps the runs of one DVC experiment (``workspace``: the
    plain ``dvc repro``)."""
    from mlflow.tracking import MlflowClient

    from nft.tracking import from_mlflow_key
    from nft.tracking_store import resolve_uri

    client = MlflowClient(tracking_uri=resolve_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found at {resolve_uri(tracking_uri)}")
    hist, final, problems = [], [], []
    runs = [
        r
        for r in client.search_runs([exp.experiment_id], max_results=10000)
        if "algorithm" in r.data.tags  # training runs; sweep parents and foreign runs have no algorithm tag
        and (dvc_exp is None or r.data.tags.get("dvc.exp_name", "workspace") == dvc_exp)
    ]
    for run in sorted(_latest_per_arm(runs, problems), key=lambda r: r.info.run_name or ""):
        tags, params = run.data.tags, run.data.params
        algo = tags["algorithm"]
        overrides = {}
        prefix = f"resolved.train.loss.{algo}."
        for k, v in params.items():
            if k.startswith(prefix):
                overrides[k[len(prefix) :]] = yaml.safe_load(v)
        name = run.info.run_name or f"{algo}-s{tags.get('seed')}"
        ident = {
            "run": name,
            "algorithm": algo,
            "arm": tags.get("arm") or arm_name(algo, overrides),
            "seed": int(tags.get("seed", 0)),
        }
        by_step: dict[int, dict] = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                by_step.setdefault(int(m.step), {})[from_mlflow_key(key)] = m.value  # last value per step wins
        rows = [{"step": s, **v} for s, v in sorted(by_step.items())]
        if run.info.status != "FINISHED":
            problems.append(f"{name}: MLflow status {run.info.status}")
        _add_run(ident, rows, evals_dir, hist, final)
    _add_base(evals_dir, final)
    return (pd.DataFrame(hist, columns=HISTORY_COLUMNS), pd.DataFrame(final, columns=FINAL_COLUMNS), problems)


def curve(history: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``arm x step`` mean, std and count over seeds of one metric (NaN dropped; runs of unequal length give
    fewer seeds at late steps, reported in ``n``)."""
    sub = history[history.metric == metric].dropna(subset=["value"])
    if sub.empty:
        return pd.DataFrame(columns=["arm", "step", "mean", "std", "n"])
    g = sub.groupby(["arm", "step"])["value"]
    out = g.agg(["mean", "std", "count"]).reset_index().rename(columns={"count": "n"})
    out["std"] = out["std"].fillna(0.0)
    return out


def seed_matrix(final: pd.DataFrame, arm: str, metric: str, benchmarks: list[str]) -> np.ndarray:
    """``(seeds x benchmarks)`` array of one metric for one arm (NaN where a seed lacks a benchmark)."""
    sub = final[(final.arm == arm) & (final.metric == metric)]
    table = sub.pivot_table(index="seed", columns="benchmark", values="value", aggfunc="mean")
    return table.reindex(columns=benchmarks).to_numpy(dtype=float)
