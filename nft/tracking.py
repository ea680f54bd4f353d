"""Experiment tracking behind a thin interface: MLflow, or nothing (tests).

The run folder is the source of truth (``config.yaml``, ``history.jsonl``, ``metrics.json``); MLflow mirrors it.
If the tracking server cannot be reached, training goes on with a warning and ``nft replay RUN_DIR`` later copies the
run folder into MLflow (same params, tags and metric histories: :mod:`nft.tracking_replay`).

Where the runs go (``sqlite:///<repository>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` or the config's
``tracking_uri`` says otherwise; ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` shows it) and how the study's
experiment and parent run are found: :mod:`nft.tracking_store`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Protocol

from .tracking_store import experiment_id, fail_fast, resolve_uri, store_lock


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
    """One MLflow run; metrics buffered and written with ``log_batch``. A failing call is retried with backoff
    (``retries`` times: 1, 2, 4 ... s); only then does the tracker go offline (a warning, no exception), and the run
    folder keeps everything for ``nft replay``, which continues the same run."""

    _buffer: list[Any]  # mlflow Metric entries not yet written
    _monitor: Any  # mlflow's SystemMetricsMonitor once started, else None

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        flush_every: int = 1,
        tags: dict[str, str] | None = None,
        retries: int = 3,
    ):
        fail_fast()  # each call fails fast; the retries below are ours, with backoff
        self.uri, self.offline, self.run_id = resolve_uri(uri), False, run_id
        self.retries, self._buffer, self.flush_every = retries, [], flush_every
        self._monitor = None
        try:
            from mlflow.tracking import MlflowClient

            with store_lock(self.uri):  # the client creates a new store's tables
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._retry(lambda: experiment_id(self.client, experiment, self.uri))
            if run_id is None:
                all_tags = {"mlflow.runName": run_name, **(tags or {})}
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                self.run_id = self._retry(
                    lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=run_name).info.run_id
                )
            else:
                self._retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        except Exception as e:  # noqa: BLE001 - server down, bad URI, ...
            self._go_offline(e)

    def _retry(self, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception:  # noqa: BLE001
                if attempt == self.retries:
                    raise
                time.sleep(2**attempt)

    def _go_offline(self, err: Exception) -> None:
        if not self.offline:
            print(
                f"tracking: MLflow at {self.uri} unavailable after {self.retries} retries ({type(err).__name__}: "
                f"{str(err)[:160]}); continuing offline, replay later with `nft replay RUN_DIR`",
                file=sys.stderr,
            )
        self.offline = True

    def _call(self, fn, *args, **kwargs) -> None:
        if self.offline:
            return
        try:
            self._retry(lambda: fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001
            self._go_offline(e)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items) if not self.offline else 0, 100):
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if not self.offline:
            self._call(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, v, ts, step) for k, v in _clean_metrics(metrics).items()]
        if len(self._buffer) and step % self.flush_every == 0:
            self.flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.offline:
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Every file under ``folder``."""
        if not self.offline:
            self._call(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """The data the run trained on, as an MLflow dataset input (the runs table's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = DatasetInput(
            Dataset(name=name, digest=digest, source_type="local", source=source),
            tags=[InputTag("mlflow.data.context", context)],
        )
        if not self.offline:
            self._call(self.client.log_inputs, self.run_id, datasets=[ds])

    def start_system_metrics(self, interval: float = 10.0) -> None:
        """CPU, memory, disk, network (and GPU where present) every ``interval`` s, as MLflow's system/* metrics."""
        if self.offline:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - an optional extra: never fatal
            print(f"tracking: system metrics unavailable ({type(e).__name__}: {e})", file=sys.stderr)

    def flush(self) -> None:
        buf, self._buffer = self._buffer, []
        if self.offline:
            return
        for i in range(0, len(buf), 1000):
            self._call(self.client.log_batch, self.run_id, metrics=buf[i : i + 1000])

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        self.flush()
        if not self.offline:
            self._call(self.client.set_terminated, self.run_id, status=status)
