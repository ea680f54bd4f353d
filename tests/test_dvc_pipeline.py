"""`dvc repro` on a copy of the repository with a smoke params file: every stage's outs, then a training param
change reruns only train/evaluate/analyze."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY

SMOKE = {
    "study": {"name": "smoke", "launcher": "nft"},
    "algorithms": ["nft", "grpo"],
    "seeds": [0],
    **{k: v for k, v in TINY.items() if k != "train"},
    "train": {**TINY["train"], "model": "models/base", "data": "data", "tracking": False},
    "eval": {"benchmarks": ["synth-easy", "synth-medium"], "k": 2, "limit": 6, "max_new_tokens": 24, "workers": 1},
}


def _dvc(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def repo_copy(tmp_path):
    dst = tmp_path / "repo"
    top = {".venv", ".git", "data", "models", "runs", "evals", "reports", "mlflow.db", "tmp", "dvc.lock"}
    anywhere = shutil.ignore_patterns("__pycache__", ".pytest_cache", "*.egg-info")

    def ignore(folder, names):
        skip = set(anywhere(folder, names))
        if Path(folder) == REPO:
            skip |= top & set(names)
        return skip

    shutil.copytree(REPO, dst, ignore=ignore)
    shutil.rmtree(dst / ".dvc" / "cache", ignore_errors=True)
    shutil.rmtree(dst / ".dvc" / "tmp", ignore_errors=True)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    (dst / "params.yaml").write_text(yaml.safe_dump(SMOKE, sort_keys=False))
    return dst


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_smoke_and_selective_rerun(repo_copy):
    r = _dvc(repo_copy, "repro")
    assert _ran(r.stdout) == {"prepare", "base", "train@nft-0", "train@grpo-0", "evaluate@nft-0", "evaluate@grpo-0",
                              "analyze"}
    for run in ("nft-s0", "grpo-s0"):
        assert (repo_copy / "runs" / run / "metrics.json").is_file()
        assert (repo_copy / "runs" / run / "model" / "model.safetensors").is_file()
        ev = json.loads((repo_copy / "evals" / f"{run}.json").read_text())
        assert set(ev["benchmarks"]) == {"synth-easy", "synth-medium"}
    assert (repo_copy / "reports" / "summary.md").is_file()
    assert (repo_copy / "reports" / "figures" / "val_accuracy.png").is_file()
    assert (repo_copy / "data" / "train.jsonl").is_file() and (repo_copy / "models" / "base" / "config.json").is_file()

    shown = _dvc(repo_copy, "metrics", "show").stdout
    assert "evals/nft-s0.json" in shown and "avg@2" in shown

    _dvc(repo_copy, "plots", "show", "--out", "plots_html")
    assert (repo_copy / "plots_html" / "index.html").is_file()

    # a training param changes: train, evaluate and analyze rerun; prepare and base do not
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["lr"] = 2e-3
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = _dvc(repo_copy, "repro")
    assert _ran(r.stdout) == {"train@nft-0", "train@grpo-0", "evaluate@nft-0", "evaluate@grpo-0", "analyze"}
    # nothing changed: nothing runs
    r = _dvc(repo_copy, "repro")
    assert _ran(r.stdout) == set()


def test_bad_params_stop_before_any_stage(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["train"]["promts_per_step"] = 3
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "nft.cli", "check", "--config", "params.yaml"], cwd=repo_copy,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "train.promts_per_step" in r.stderr
