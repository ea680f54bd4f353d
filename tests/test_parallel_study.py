"""Running a study's stages side by side (``make study``: scripts/repro_parallel.py, two stages at once):

- two train runs starting together on a fresh MLflow sqlite store both land in it, under one study run (without the
  store lock one of them went offline: "table ... already exists");
- the parallel ``dvc repro`` runs every matching stage, side by side, and leaves the pipeline up to date; a failing
  stage fails the whole command with its log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "repro_parallel.py"
DVC = str(Path(sys.executable).parent / "dvc")  # the environment's dvc (make test does not put .venv/bin on PATH)

_TRACKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlflow  # imported before the barrier: the processes then touch the store together
    from nft.tracking import MLflowTracker
    from nft.tracking_store import study_run
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    parent = study_run(sys.argv[1], "race")
    t = MLflowTracker(sys.argv[1], "race", f"run-{sys.argv[3]}", parent_run_id=parent, retries=0)
    t.log_metrics({"x": 1.0}, step=0)
    t.finish()
    print("offline" if t.offline or parent is None else "online")
""")


def test_runs_starting_together_on_a_fresh_store_are_all_tracked(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TRACKER, uri, str(go), str(i)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    time.sleep(4)  # all three have imported mlflow and wait at the barrier
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [o.strip().splitlines()[-1] for o, _ in outs] == ["online"] * 3, [e[-600:] for _, e in outs]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("race")
    runs = client.search_runs([exp.experiment_id])
    studies = [r for r in runs if r.data.tags.get("nft.role") == "study"]
    trains = sorted(r.info.run_name for r in runs if r.data.tags.get("nft.role") != "study")
    assert len(studies) == 1 and trains == ["run-0", "run-1", "run-2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r.info.run_name.startswith("run-")} == {
        studies[0].info.run_id
    }


def _dvc_repo(tmp_path: Path, cmd: str) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(
        textwrap.dedent(f"""
        stages:
          first:
            cmd: echo base > base.txt
            outs: [base.txt]
          work:
            matrix:
              i: [1, 2, 3, 4]
            cmd: {cmd}
            deps: [base.txt]
            outs:
              - out/${{item.i}}.txt
          last:
            cmd: cat out/*.txt > all.txt
            deps: [out]
            outs: [all.txt]
        """)
    )
    return repo


def _run(repo: Path, jobs: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--jobs", str(jobs), "--first", "first", "--chain", "work"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_parallel_repro_runs_stages_side_by_side_and_leaves_the_pipeline_up_to_date(tmp_path):
    # each stage records when it ran; with 2 jobs, some two of them overlap
    repo = _dvc_repo(
        tmp_path,
        "mkdir -p out times && date +%s.%N > times/${item.i}.start && sleep 2 && "
        "echo ${item.i} > out/${item.i}.txt && date +%s.%N > times/${item.i}.end",
    )
    res = _run(repo, jobs=2)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert (repo / "all.txt").read_text().split() == ["1", "2", "3", "4"]
    spans = [
        (float((repo / f"times/{i}.start").read_text()), float((repo / f"times/{i}.end").read_text()))
        for i in range(1, 5)
    ]
    overlaps = sum(1 for a in spans for b in spans if a < b and a[0] < b[1] and b[0] < a[1])
    assert overlaps >= 1, spans
    assert "[4/4]" in res.stdout
    status = subprocess.run([DVC, "status"], cwd=repo, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    lock = (repo / "dvc.lock").read_text()
    assert all(f"work@{i}:" in lock for i in range(1, 5)) and "last:" in lock


def test_parallel_repro_fails_on_a_failing_stage_with_its_log(tmp_path):
    repo = _dvc_repo(
        tmp_path,
        "mkdir -p out && test ${item.i} != 3 || (echo boom-${item.i}; exit 7) && echo ${item.i} > out/${item.i}.txt",
    )
    res = _run(repo, jobs=2)
    assert res.returncode != 0
    assert "work@3 FAILED" in res.stdout and "boom-3" in res.stdout
    assert not (repo / "all.txt").exists()


def test_parallel_repro_rejects_a_chain_not_in_the_pipeline(tmp_path):
    repo = _dvc_repo(tmp_path, "mkdir -p out && echo ${item.i} > out/${item.i}.txt")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--chain", "nothing"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "no matrix stage 'nothing'" in res.stderr
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--chain", "work", "evaluate"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "'evaluate@1'" in res.stderr


@pytest.mark.parametrize("jobs", [0])
def test_parallel_repro_rejects_bad_jobs(tmp_path, jobs):
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--jobs", str(jobs), "--chain", "x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--jobs" in res.stderr
