"""What a user sees in MLflow's UI, checked in a real browser (headless Chromium, installed by .ci/run): a smoke study
tracked to a real `mlflow server`; the experiment opens on its training runs, each run shows its algorithm, seed,
dataset, source and final avg@k, and the sweep sits in its own experiment."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import nft_cli
from tests.train.test_loop import mlflow_server  # noqa: F401  (fixture: a real server on a free port)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _dom(url: str) -> str:
    """The page's text as rendered (scripts run), tags and styles stripped, whitespace collapsed."""
    r = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=3000,1600",
            "--virtual-time-budget=20000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", r.stdout, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs Debian's package)")
def test_mlflow_ui_shows_the_study(tiny_study, tmp_path, mlflow_server):  # noqa: F811
    from mlflow.tracking import MlflowClient

    params, data, _ = tiny_study
    track = [
        "--set",
        "train.tracking=true",
        "--set",
        f"train.tracking_uri={mlflow_server}",
        "--set",
        "study.name=ui-study",
        "--set",
        "train.steps=1",
    ]
    runs = {}
    for arm in ("nft", "grpo"):
        run = tmp_path / f"{arm}-s0"
        nft_cli("train", "--config", params, "--arm", arm, "--seed", "0", "--out", run, "--quiet", *track)
        nft_cli(
            "evaluate",
            "--model",
            run / "model",
            "--benchmarks",
            "synth-easy",
            "--k",
            "2",
            "--limit",
            "4",
            "--data",
            data,
            "--out",
            tmp_path / "evals" / f"{arm}-s0.json",
        )
        runs[arm] = (run / "mlflow_run_id").read_text().strip()
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "arm": "nft",
                "metric": "val/mean/avg@2",
                "direction": "maximize",
                "params": {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-4}},
            }
        )
    )
    nft_cli(
        "sweep",
        "--config",
        params,
        "--space",
        space,
        "--trials",
        "1",
        "--study-name",
        "uisweep",
        "--storage",
        f"sqlite:///{tmp_path}/optuna.db",
        "--out-dir",
        tmp_path / "sweeps",
        "--quiet",
        *track,
    )

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("ui-study")
    sweeps = client.get_experiment_by_name("ui-study-sweeps")
    assert sweeps is not None and sweeps.experiment_id != exp.experiment_id
    # MLflow 3.17's UI picks an experiment's first page from its GenAI / model-training switch (remembered per
    # browser, GenAI in a fresh one) rather than from the experiment's kind tag; the links nft gives carry the switch
    page = _dom(f"{mlflow_server}/#/experiments/{exp.experiment_id}?workflowType=machine_learning")
    assert "Runs - Experiment" in page and "Traces 0" not in page  # the runs table, not GenAI traces
    # the train runs are nested under the study's run: the table shows it (collapsed) and counts them all
    assert "ui-study" in page and "3 matching runs" in page, "the runs table lacks the study run and its children"
    assert "uisweep" not in page  # the sweep's runs are not among the study's
    for arm, run_id in runs.items():
        page = _dom(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs/{run_id}?workflowType=machine_learning")
        for text in (f"{arm}-s0", arm, "train", "nft train", "final/synth-easy/avg_at_2"):
            assert text in page, f"run page of {arm}-s0 lacks {text!r}"
    page = _dom(f"{mlflow_server}/#/experiments/{sweeps.experiment_id}?workflowType=machine_learning")
    assert "sweep-uisweep" in page
