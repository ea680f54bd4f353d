"""Optuna sweeps for real on the tiny study: two workers share sqlite or PostgreSQL storage; a worker killed mid-trial;
pruning; nested MLflow runs; a crashing trial; `sweep best`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import nft_cli

SPACE = {
    "arm": "nft",
    "metric": "val/mean/avg@2",
    "direction": "maximize",
    "pruner": {"type": "none"},
    "sampler_seed": 0,
    "heartbeat": {"interval": 1, "grace": 3, "retries": 1},
    "base": {"train.steps": 2, "train.val_every": 1},
    "params": {
        "train.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
        "train.loss.nft.omega": {"type": "categorical", "choices": ["one", "one_minus_r", "sqrt"]},
    },
}


def _space(tmp_path, **changes) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({**SPACE, **changes}))
    return p


def _two_workers(params, space, storage, study, tmp_path, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "nft.cli",
        "sweep",
        "--config",
        str(params),
        "--space",
        str(space),
        "--trials",
        "4",
        "--study-name",
        study,
        "--storage",
        storage,
        "--out-dir",
        str(tmp_path / "sweeps"),
        "--quiet",
        *extra,
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return outs


def _check_trials(storage, study, n=4):
    """``n`` finished trials (one more if two workers asked for the last one at the same instant), none running."""
    import optuna

    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    assert n <= len(trials) <= n + 1 and sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state.is_finished() for t in trials)
    return trials


def test_sqlite_two_workers_and_nested_mlflow(tiny_study, tmp_path):
    from mlflow.tracking import MlflowClient

    params, _, _ = tiny_study
    storage = f"sqlite:///{tmp_path}/optuna.db"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _two_workers(
        params,
        _space(tmp_path),
        storage,
        "s1",
        tmp_path,
        ["--set", "train.tracking=true", "--set", f"train.tracking_uri={uri}", "--set", "train.experiment=sweeps"],
    )
    trials = _check_trials(storage, "s1")
    assert all(t.state.name == "COMPLETE" for t in trials)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("sweeps-sweeps")  # train.experiment + "-sweeps": apart from the study's runs
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mlflow.runName") == "sweep-s1"]
    import optuna

    parent_id = optuna.load_study(study_name="s1", storage=storage).user_attrs["mlflow_parent_run_id"]
    assert parent_id in {r.info.run_id for r in parents}
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(int(r.data.params["trial"]) for r in nested) == [t.number for t in trials]
    for r in nested:
        assert r.data.params["seeds"] == "0" and "train.lr" in r.data.params
        assert "objective" in r.data.metrics and "seed0/val/mean/avg_at_2" in r.data.metrics

    best = tmp_path / "best.yaml"
    nft_cli("sweep", "best", "--study-name", "s1", "--storage", storage, "--config", params, "--out", best)
    chosen = yaml.safe_load(best.read_text())
    study = optuna.load_study(study_name="s1", storage=storage)
    assert chosen["train"]["lr"] == pytest.approx(study.best_params["train.lr"])
    assert chosen["train"]["loss"]["nft"]["omega"] == study.best_params["train.loss.nft.omega"]
    nft_cli("check", "--config", best, check=False)  # the written file is a valid params file
    assert (
        nft_cli(
            "train",
            "--config",
            best,
            "--arm",
            "nft",
            "--seed",
            "0",
            "--out",
            tmp_path / "from-best",
            "--quiet",
            "--set",
            "train.steps=1",
        ).returncode
        == 0
    )


def _kill_one_worker_mid_trial(params, space, storage, study, tmp_path):
    """Two workers; worker b is killed (SIGKILL) while it runs a trial. The other finishes the study: the dead
    trial is failed once its heartbeat is stale and retried, the copy saying why; the workers' first suggestions
    differ (each has its own sampler seed)."""
    import optuna

    base = [
        sys.executable,
        "-m",
        "nft.cli",
        "sweep",
        "--config",
        str(params),
        "--space",
        str(space),
        "--trials",
        "4",
        "--study-name",
        study,
        "--storage",
        storage,
        "--out-dir",
        str(tmp_path / "sweeps"),
        "--quiet",
    ]
    procs = {
        w: subprocess.Popen(base + ["--worker", w], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in ("a", "b")
    }
    deadline = time.time() + 300
    victim = None
    while time.time() < deadline and victim is None:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials()
        except Exception:  # noqa: BLE001 - the study is being created
            continue
        victim = next((t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("worker") == "b"), None)
    assert victim is not None, "worker b never ran a trial"
    time.sleep(1.0)  # mid-trial
    procs["b"].send_signal(signal.SIGKILL)
    out, err = procs["a"].communicate(timeout=600)
    assert procs["a"].returncode == 0, err
    procs["b"].wait()
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    dead = trials[victim.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["worker"] == "b"
    copies = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert (
        len(copies) == 1
        and copies[0].state.name == "COMPLETE"
        and "heartbeat stopped" in copies[0].user_attrs["retry_reason"]
    )
    assert copies[0].params == dead.params  # the retry runs the same setting
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(finished) <= 5 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    first = {
        w: min(
            (t for t in trials if t.user_attrs.get("worker") == w and t.user_attrs.get("retry_of") is None),
            key=lambda t: t.number,
        )
        for w in ("a", "b")
    }
    assert first["a"].params != first["b"].params
    assert first["a"].user_attrs["sampler_seed"] != first["b"].user_attrs["sampler_seed"]


@pytest.mark.slow  # two workers, one killed, the other waits out the heartbeat grace: CI's slow suite runs it
def test_a_worker_killed_mid_trial_sqlite(tiny_study, tmp_path):
    params, _, _ = tiny_study
    space = _space(tmp_path, base={"train.steps": 3, "train.val_every": 1})
    _kill_one_worker_mid_trial(params, space, f"sqlite:///{tmp_path}/kill.db", "k", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NFT_TEST_PG_URL"), reason="no PostgreSQL server (.ci/run starts one)")
def test_a_worker_killed_mid_trial_postgres(tiny_study, tmp_path):
    params, _, _ = tiny_study
    space = _space(tmp_path, base={"train.steps": 3, "train.val_every": 1})
    _kill_one_worker_mid_trial(params, space, os.environ["NFT_TEST_PG_URL"], f"kill{os.getpid()}", tmp_path)


def _pg_url():
    return os.environ.get("NFT_TEST_PG_URL")


@pytest.mark.skipif(not _pg_url(), reason="no PostgreSQL server (.ci/run starts one and sets NFT_TEST_PG_URL)")
def test_postgres_two_workers(tiny_study, tmp_path):
    params, _, _ = tiny_study
    study = f"pg{os.getpid()}"
    _two_workers(params, _space(tmp_path), _pg_url(), study, tmp_path)
    _check_trials(_pg_url(), study)


def test_pruning_and_a_crashing_trial(tiny_study, tmp_path):
    """Two good trials set the median; a trial with a destructive learning rate falls below it after its first
    update and is pruned; a trial whose sampler cannot start fails with its error, and the sweep goes on."""
    import optuna

    from nft.sweep import run_sweep

    params, _, _ = tiny_study
    storage = f"sqlite:///{tmp_path}/prune.db"
    space = _space(
        tmp_path,
        pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        metric="val/mean/avg@4",
        base={"train.steps": 3, "train.val_every": 1, "train.val_limit": 24, "train.val_k": 4},
        params={
            "train.lr": {"type": "float", "low": 1e-4, "high": 10.0, "log": True},
            "train.sampler": {"type": "categorical", "choices": ["torch", "vllm"]},
        },
    )
    study = optuna.create_study(study_name="p", storage=storage, direction="maximize")
    for lr, sampler in [(1e-4, "torch"), (1e-4, "torch"), (10.0, "torch"), (1e-4, "vllm")]:
        study.enqueue_trial({"train.lr": lr, "train.sampler": sampler})
    summary = run_sweep(
        str(params), str(space), 4, "p", storage, [0], ["train.tracking=false"], str(tmp_path / "sweeps")
    )
    trials = optuna.load_study(study_name="p", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"], states
    assert "vllm" in trials[3].user_attrs["error"].lower()
    assert summary["pruned"] == 1 and summary["failed"] == 1


def test_bad_space_fails_before_work(tiny_study, tmp_path):
    params, _, _ = tiny_study
    cases = [
        ({"params": {"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-3}}}, "train.lrr"),
        ({"params": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-4}}}, "low"),
        ({"arms": ["nft", "nope"]}, "arms: unknown ['nope']"),
    ]
    for changes, said in cases:
        bad = _space(tmp_path, **changes)
        storage = f"sqlite:///{tmp_path}/b.db"
        r = nft_cli("sweep", "--config", params, "--space", bad, "--study-name", "b", "--storage", storage, check=False)
        assert r.returncode == 2 and said in r.stderr


def test_shared_setting_over_arms_on_a_grid(tiny_study, tmp_path):
    """``arms``: every trial trains each arm with the same setting (a named arm with its ``arm_settings``) and the
    objective is their mean; ``grid`` runs every combination once; ``sweep table`` lists each arm's value and the
    objective, best first."""
    import optuna

    from nft.sweep import run_sweep, sweep_table

    params, _, _ = tiny_study
    storage = f"sqlite:///{tmp_path}/grid.db"
    space = _space(
        tmp_path,
        arms=["nft", "grpo-pop"],
        sampler="grid",
        base={"train.steps": 1, "train.val_every": 1},
        params={"train.lr": {"type": "categorical", "choices": [1e-4, 1e-3]}},
    )
    summary = run_sweep(
        str(params),
        str(space),
        5,
        "g",
        storage,
        [0],
        ["train.tracking=false", "arm_settings.grpo-pop={algorithm: grpo, loss: {std: population}}"],
        str(tmp_path / "sweeps"),
    )
    assert summary["complete"] == 2  # the grid has two points: five trials asked, two run
    trials = optuna.load_study(study_name="g", storage=storage).get_trials()
    assert sorted(t.params["train.lr"] for t in trials) == [1e-4, 1e-3]
    for t in trials:
        per_arm = [t.user_attrs[f"value/{a}/s0"] for a in ("nft", "grpo-pop")]
        assert t.value == pytest.approx(sum(per_arm) / 2)
    assert sorted(p.name for p in (tmp_path / "sweeps" / "g").iterdir()) == [
        "trial0-grpo-pop-s0",
        "trial0-nft-s0",
        "trial1-grpo-pop-s0",
        "trial1-nft-s0",
    ]
    resolved = yaml.safe_load((tmp_path / "sweeps" / "g" / "trial0-grpo-pop-s0" / "config.yaml").read_text())[
        "resolved"
    ]
    assert resolved["algorithm"] == "grpo" and resolved["loss"]["std"] == "population"  # the arm's own loss setting
    table = sweep_table("g", storage).splitlines()
    r = nft_cli("sweep", "table", "--study-name", "g", "--storage", storage, "--config", params)
    assert r.stdout.splitlines() == table
    assert table[0] == "| trial | train.lr | nft | grpo-pop | objective | state |" and len(table) == 4
    best = max(trials, key=lambda t: t.value)
    assert table[2].startswith(f"| {best.number} |") and f"{100 * best.value:.1f}" in table[2]
    bad = _space(tmp_path, sampler="grid", params={"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}})
    r = nft_cli(
        "sweep",
        "--config",
        params,
        "--space",
        bad,
        "--study-name",
        "b",
        "--storage",
        f"sqlite:///{tmp_path}/b.db",
        check=False,
    )
    assert r.returncode == 2 and "grid needs every parameter categorical" in r.stderr


def test_a_trial_stopped_by_a_signal_is_queued_again_and_its_worker_stops(tiny_study, tmp_path, monkeypatch):
    """A worker whose trial gets SIGTERM (a preempted or timed-out SLURM job): the trial fails saying so, a copy of
    it is queued, the worker stops with Preempted (exit 143); the next worker runs the copy and finishes the study.
    Under a SLURM job array a worker's default id is its array task's."""
    import optuna

    import nft.train.run as run_mod
    from nft.sweep import run_sweep
    from nft.train import Preempted

    params, _, _ = tiny_study
    storage = f"sqlite:///{tmp_path}/pre.db"
    space = _space(tmp_path)
    real = run_mod.run_training

    def stopped(*a, **k):
        raise Preempted("train: stopped by SIGTERM after step 1 of 2; checkpoint written")

    monkeypatch.setattr(run_mod, "run_training", stopped)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    args = (str(params), str(space), 2, "pre", storage, [0], ["train.tracking=false"], str(tmp_path / "sweeps"))
    with pytest.raises(Preempted, match=r"worker slurm-77_1 stopped by a signal during trial 0; a copy is queued"):
        run_sweep(*args)
    trials = optuna.load_study(study_name="pre", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "WAITING"]
    assert trials[0].user_attrs["error"].startswith("Preempted: train: stopped by SIGTERM")
    assert trials[1].user_attrs["retry_of"] == 0 and "stopped by a signal" in trials[1].user_attrs["retry_reason"]
    monkeypatch.setattr(run_mod, "run_training", real)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    summary = run_sweep(*args, worker="b")
    trials = optuna.load_study(study_name="pre", storage=storage).get_trials()
    assert trials[1].state.name == "COMPLETE" and trials[1].params == trials[0].params
    assert summary["complete"] == 2
