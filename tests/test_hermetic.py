"""The tests never see the checkout's own study: the analysis and CLI tests pass when started from a working
directory whose outputs (``evals/``, ``runs/``, ``reports/``, ``mlflow.db``, ...) are decoys that any reader chokes on,
as a checkout holds them after ``make study``."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import CHECKOUT_OUTPUTS, REPO

DECOYS = (
    "evals/base.json",
    "evals/nft-s0.json",
    "evals/nft-s0.meta.json",
    "runs/nft-s0/metrics.json",
    "runs/nft-s0/history.jsonl",
    "runs/nft-s0/config.yaml",
    "checkpoints/nft-s0/fingerprint",
    "reports/metrics.json",
    "data/train.jsonl",
    "data/synth-easy.jsonl",
    "models/base/config.json",
    "sweeps/s.db",
    "mlflow.db",
    "dvc.lock",
)
#: the tests whose commands default to paths relative to the working directory
SUITES = ("tests/analysis", "tests/test_evaluate.py")


def test_analysis_and_cli_tests_ignore_decoy_outputs_in_the_working_directory(tmp_path):
    checkout = tmp_path / "checkout"
    for rel in DECOYS:
        path = checkout / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{decoy: not an output of any study\n")
    assert {p.split("/")[0] for p in DECOYS} == set(CHECKOUT_OUTPUTS)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:warnings",
            "--rootdir",
            str(REPO),
            "-c",
            str(REPO / "pyproject.toml"),
            *[str(REPO / s) for s in SUITES],
        ],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert all((checkout / rel).read_text().startswith("{decoy") for rel in DECOYS)  # nothing overwritten
