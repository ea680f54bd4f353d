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

#: what the training runs of a study are in MLflow's UI (the experiment then opens on its runs, not on GenAI traces)
EXPERIMENT_KIND = "custom_model_development"
#: tag of a study's parent run, which holds the analysis; the train runs are nested under it
STUDY_ROLE = "nft.role"


def study_root(cwd: str | Path | None = None) -> Path:
    """The repository a command works for: the working directory, except inside the copies DVC runs queued and
    temporary experiments in (``<repo>/.dvc/tmp/exps/...``), whose runs belong to ``<repo>``'s store."""
    parts = Path(cwd or os.getcwd()).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(*parts)


def resolve_uri(uri: str = "") -> str:
    """The tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<study root>/mlflow.db`` (an
    absolute path: every workspace DVC uses, queued experiments included, logs into the one store)."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{study_root() / 'mlflow.db'}"


def store_lock(uri: str):
    """A lock around find-or-create on the store (tables, experiment, study run): several runs start at once under
    ``make study`` (two stages at a time), and two processes creating one sqlite store's tables, or one study's parent
    run, race (measured: one of two train runs started together on a fresh store went offline with "table ... already
    exists"). A file lock beside a sqlite file; other stores (a server) need none for the tables."""
    from contextlib import nullcontext

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock", timeout=300)


def fail_fast() -> None:
    """Each HTTP call to a tracking server fails within seconds (MLflow's own default retries for minutes); the
    callers retry with backoff themselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def dvc_experiment() -> str:
    """The DVC experiment this process runs for (``dvc exp run`` sets ``DVC_EXP_NAME``), else ``workspace``."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def git_state(root: Path | None = None) -> dict[str, str]:
    """MLflow's source tags: the commit (the UI's Version column) and whether the tree had local changes."""
    import subprocess

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=root or study_root(), capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:  # noqa: BLE001 - no git, not a repository
            return ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    return {"mlflow.source.git.commit": commit, "nft.git_dirty": str(bool(git("status", "--porcelain", "-uno")))}


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


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment ``name`` (created if missing, as a model-training experiment; on a local store its artifacts go
    to ``<study root>/mlartifacts``, so that queued DVC experiments' artifacts are not lost with their workspace)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
            client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
        return exp.experiment_id
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = (study_root() / "mlartifacts").as_uri() if local else None
    return client.create_experiment(name, artifact_location=location, tags={"mlflow.experimentKind": EXPERIMENT_KIND})


def study_run(uri: str, study: str, create: bool = True) -> str | None:
    """The id of the study's parent run (one per study and DVC experiment; found by its tags, created by the first
    train run): its train runs nest under it and the analysis is logged into it. None when MLflow is unreachable."""
    fail_fast()
    try:
        from mlflow.tracking import MlflowClient

        with store_lock(resolve_uri(uri)):  # one store and one study run, however many train runs start at once
            client = MlflowClient(tracking_uri=resolve_uri(uri))
            exp_id = experiment_id(client, study, resolve_uri(uri))
            dvc_exp = dvc_experiment()
            found = client.search_runs(
                [exp_id],
                filter_string=f"tags.`{STUDY_ROLE}` = 'study' and tags.`dvc.exp_name` = '{dvc_exp}'",
                max_results=1,
            )
            if found:
                return found[0].info.run_id
            if not create:
                return None
            name = study if dvc_exp == "workspace" else f"{study} ({dvc_exp})"
            run = client.create_run(
                exp_id,
                run_name=name,
                tags={
                    "mlflow.runName": name,
                    STUDY_ROLE: "study",
                    "dvc.exp_name": dvc_exp,
                    "study": study,
                    **git_state(),
                },
            )
            return run.info.run_id
    except Exception as e:  # noqa: BLE001
        print(f"tracking: no study run ({type(e).__name__}: {str(e)[:160]})", file=sys.stderr)
        return None


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
