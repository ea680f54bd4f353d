"""Experiment tracking behind a thin interface: MLflow, or nothing (tests).

The run folder is the source of truth (``config.yaml``, ``history.jsonl``, ``metrics.json``); MLflow mirrors it.
If the tracking server cannot be reached, training goes on with a warning and ``nft replay RUN_DIR`` later copies the
run folder into MLflow (same params, tags and metric histories).

Default store: ``sqlite:///<cwd>/mlflow.db`` (``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it);
``MLFLOW_TRACKING_URI`` or the config's ``tracking_uri`` override it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_uri(uri: str = "") -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_URI


class Tracker(Protocol):
    """What the loop and the sweep use of an experiment tracker."""

    run_id: str | None
    offline: bool
    """True once the store could not be reached (the run folder keeps everything for ``nft replay``)."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def flush(self) -> None:
        """Write what is buffered (at each checkpoint)."""

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records nothing (tests, dry runs, a sweep's per-seed runs whose trial run carries the results)."""

    run_id: str | None = None
    offline = False

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def flush(self) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


def mlflow_key(key: str) -> str:
    """MLflow names allow alphanumerics, ``_ - . space : /`` only: ``val/synth-easy/avg@4`` is logged as
    ``val/synth-easy/avg_at_4`` (:func:`from_mlflow_key` reverses it)."""
    return key.replace("@", "_at_")


def from_mlflow_key(key: str) -> str:
    import re

    return re.sub(r"_at_(\d+)", r"@\1", key)


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    import math

    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[mlflow_key(k)] = float(v)
    return out


class MLflowTracker:
    """One MLflow run; metrics buffered and written with ``log_batch``. Any tracking failure switches the tracker
    offline (a warning, no exception): the run folder keeps everything for ``nft replay``."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 parent_run_id: str | None = None, flush_every: int = 1):
        # fail fast when a server is down instead of MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self.uri, self.offline, self.run_id = resolve_uri(uri), False, run_id
        self._buffer: list = []
        self.flush_every = flush_every
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            if run_id is None:
                tags = {"mlflow.runName": run_name}
                if parent_run_id:
                    tags["mlflow.parentRunId"] = parent_run_id
                self.run_id = self.client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as e:  # noqa: BLE001 - server down, bad URI, ...
            self._go_offline(e)

    def _go_offline(self, err: Exception) -> None:
        if not self.offline:
            print(f"tracking: MLflow at {self.uri} unavailable ({type(err).__name__}: {str(err)[:160]}); "
                  f"continuing offline, replay later with `nft replay RUN_DIR`", file=sys.stderr)
        self.offline = True

    def _call(self, fn, *args, **kwargs) -> None:
        if self.offline:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._go_offline(e)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call(self.client.log_batch, self.run_id, params=items[i: i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, v, ts, step) for k, v in _clean_metrics(metrics).items()]
        if len(self._buffer) and step % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        buf, self._buffer = self._buffer, []
        for i in range(0, len(buf), 1000):
            self._call(self.client.log_batch, self.run_id, metrics=buf[i: i + 1000])

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self._call(self.client.set_terminated, self.run_id, status=status)


def replay(run_dir: str | Path, uri: str = "", experiment: str | None = None) -> str:
    """Copy a run folder (config.yaml, history.jsonl, tags.json, metrics.json) into MLflow as a new run; returns
    its run id. Used when training ran offline."""
    import yaml

    from .config import flatten

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a run folder (config.yaml missing)")
    cfg = yaml.safe_load(cfg_path.read_text())
    tags = json.loads((run_dir / "tags.json").read_text()) if (run_dir / "tags.json").is_file() else {}
    exp = experiment or tags.get("study", "nft-study")
    tracker = MLflowTracker(uri, exp, run_dir.name)
    if tracker.offline:
        raise RuntimeError(f"replay: MLflow at {tracker.uri} is unreachable")
    tracker.log_params(flatten(cfg))
    tracker.set_tags({**tags, "replayed_from": str(run_dir.resolve())})
    hist = run_dir / "history.jsonl"
    if hist.is_file():
        for line in hist.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, int(row["step"]))
    final = run_dir / "metrics.json"
    status = "FINISHED" if final.is_file() else "KILLED"
    tracker.finish(status)
    (run_dir / "mlflow_run_id").write_text(tracker.run_id)
    return tracker.run_id
