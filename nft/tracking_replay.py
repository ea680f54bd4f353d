"""Run folders into MLflow after the fact: ``nft replay`` (a run that trained offline), the final evaluation
into its train run (``nft evaluate``), and the analysis into the study's run (``python -m analysis``)."""

from __future__ import annotations

import json
from pathlib import Path

from .tracking import MLflowTracker, mlflow_key
from .tracking_store import resolve_uri, study_run


def log_to_run(run_dir: str | Path, metrics: dict[str, float], step: int, artifacts: list[Path]) -> str | None:
    """Add ``metrics`` (at ``step``) and ``artifacts`` to the MLflow run of a run folder (``nft evaluate`` logs the
    final evaluation into the train run this way). Nothing happens for a run that was not tracked; an unreachable
    store is a warning. Returns the run id logged into."""
    import yaml

    run_dir = Path(run_dir)
    id_file, cfg_file = run_dir / "mlflow_run_id", run_dir / "config.yaml"
    if not id_file.is_file() or not cfg_file.is_file():
        return None
    train = (yaml.safe_load(cfg_file.read_text()).get("resolved") or {}).get("train") or {}
    if not train.get("tracking", True):
        return None
    tags = json.loads((run_dir / "tags.json").read_text()) if (run_dir / "tags.json").is_file() else {}
    tracker = MLflowTracker(
        train.get("tracking_uri", ""),
        train.get("experiment") or tags.get("study", "nft-study"),
        run_dir.name,
        run_id=id_file.read_text().strip(),
    )
    tracker.log_metrics(metrics, step)
    for a in artifacts:
        tracker.log_artifact(a, "evaluation")
    tracker.finish("FINISHED")
    return None if tracker.offline else tracker.run_id


def log_study(runs_dir: str | Path, reports: str | Path, metrics: dict[str, float]) -> list[str]:
    """Log the analysis (every file under ``reports`` and the summary ``metrics``) into the study run(s) the train
    runs under ``runs_dir`` are nested in, and mark them finished. Returns the run ids logged into."""
    import yaml

    studies: dict[str, tuple[str, str]] = {}
    for tags_file in sorted(Path(runs_dir).glob("*/tags.json")):
        tags = json.loads(tags_file.read_text())
        cfg_file = tags_file.parent / "config.yaml"
        train = (
            (yaml.safe_load(cfg_file.read_text()).get("resolved") or {}).get("train", {}) if cfg_file.is_file() else {}
        )
        if tags.get("mlflow.parentRunId") and train.get("tracking", True):
            studies[tags["mlflow.parentRunId"]] = (
                train.get("tracking_uri", ""),
                train.get("experiment") or tags.get("study", "nft-study"),
            )
    done = []
    for run_id, (uri, experiment) in studies.items():
        tracker = MLflowTracker(uri, experiment, "study", run_id=run_id)
        tracker.log_metrics(metrics, 0)
        tracker.log_artifacts(reports, "analysis")
        tracker.finish("FINISHED")
        if not tracker.offline:
            done.append(run_id)
    return done


def replay(run_dir: str | Path, uri: str = "", experiment: str | None = None) -> str:
    """Copy a run folder (config.yaml, history.jsonl, tags.json, metrics.json) into MLflow after training ran
    offline; returns the run id. The run it was logging into (``mlflow_run_id``) is continued: only the metric
    values it lacks are added, so a replay never makes a duplicate run. A folder that never reached MLflow gets a new
    run, nested under its study's run."""
    import yaml

    from .flat import flatten

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a run folder (config.yaml missing)")
    cfg = yaml.safe_load(cfg_path.read_text())
    tags = json.loads((run_dir / "tags.json").read_text()) if (run_dir / "tags.json").is_file() else {}
    exp = experiment or tags.get("study", "nft-study")
    id_file = run_dir / "mlflow_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    done: set[tuple[str, int]] = set()
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=resolve_uri(uri))
            for key in client.get_run(run_id).data.metrics:
                done |= {(key, int(m.step)) for m in client.get_metric_history(run_id, key)}
        except Exception:  # noqa: BLE001 - the run is not in this store: start a new one
            run_id, done = None, set()
    parent = None if run_id else tags.get("mlflow.parentRunId") or study_run(uri, exp)
    tracker = MLflowTracker(uri, exp, run_dir.name, run_id=run_id, parent_run_id=parent)
    if tracker.offline:
        raise RuntimeError(f"replay: MLflow at {tracker.uri} is unreachable")
    if run_id is None:
        tracker.log_params(flatten(cfg))
    tracker.set_tags(
        {k: v for k, v in {**tags, "replayed_from": str(run_dir.resolve())}.items() if k != "mlflow.parentRunId"}
    )
    hist = run_dir / "history.jsonl"
    if hist.is_file():
        for line in hist.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                step = int(row["step"])
                new = {k: v for k, v in row.items() if k != "step" and (mlflow_key(k), step) not in done}
                tracker.log_metrics(new, step)
    final = run_dir / "metrics.json"
    status = "FINISHED" if final.is_file() else "KILLED"
    tracker.finish(status)
    assert tracker.run_id is not None  # online (checked above): the run was continued or created
    id_file.write_text(tracker.run_id)
    return tracker.run_id
