"""Where the MLflow runs of a study go and how they are found: the store (one per repository, DVC's queued
experiments included), the lock around creating things in it, the experiment, and the study's parent run that the
train runs nest under.

Default store: ``sqlite:///<study root>/mlflow.db``; ``MLFLOW_TRACKING_URI`` or the config's ``tracking_uri`` override
it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
