"""SLURM: ``nft`` under ``srun`` takes its process group from SLURM's variables (nft.dist.adopt_slurm); a train
stage as a SLURM job (``study.slurm``, ``python -m nft.submit``: nft/slurm.py), checked in ``nft check``. Against a
real one-node SLURM (tests/slurm_cluster.py; slow suite): a 2-rank ZeRO-3 CPU training under ``srun`` ends with the
same weights as under DeepSpeed's launcher; a job sent SIGTERM mid-run checkpoints, is submitted again and resumes
to the weights of an uninterrupted run; a failed job is one line naming its id, log and error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nft.config import ConfigError, load_study
from nft.dist import _expand_counts, adopt_slurm
from nft.slurm import SlurmSection, batch_script
from tests import slurm_cluster
from tests.conftest import nft_cli
from tests.train.test_deepspeed import REPO, launch, launch_env, zero3_params

SRUN_STEP = {
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu7,gpu9",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
}


def test_srun_step_sets_the_launcher_variables():
    env = dict(SRUN_STEP)
    assert adopt_slurm(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu7",
    }
    assert 20000 <= int(env["MASTER_PORT"]) < 40000
    other = dict(SRUN_STEP, SLURM_STEP_ID="1")
    adopt_slurm(other)
    assert other["MASTER_PORT"] != env["MASTER_PORT"]  # two steps of one job on one node: two ports


def test_a_launcher_or_a_single_task_is_left_alone():
    launched = dict(SRUN_STEP, WORLD_SIZE="8", RANK="5")
    assert not adopt_slurm(launched) and launched["RANK"] == "5"  # torchrun/deepspeed inside an allocation
    single = dict(SRUN_STEP, SLURM_STEP_NUM_TASKS="1")
    assert not adopt_slurm(single) and "RANK" not in single  # a batch script, one task
    assert _expand_counts("2(x3),1") == [2, 2, 2, 1]
    env = dict(SRUN_STEP, MASTER_PORT="29400")
    adopt_slurm(env)
    assert env["MASTER_PORT"] == "29400"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not slurm_cluster.available():
        if os.environ.get("NFT_REQUIRE_SLURM"):  # .ci/run installed them: a skip would hide a broken set-up
            pytest.fail("NFT_REQUIRE_SLURM is set but slurm-wlm and munge are not usable here")
        pytest.skip("slurm-wlm and munge are not installed (or not root): .ci/run installs them")
    with slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def local_train(params, arm: str, out, cwd=REPO) -> None:
    """The same ``nft train`` run here, in a fresh process with a job's environment (an in-process run would carry
    what earlier tests changed in this process, such as an in-process vLLM engine's CPU settings)."""
    cmd = [sys.executable, "-m", "nft.cli", "train", "--config", params, "--arm", arm, "--seed", 0, "--out", out]
    r = subprocess.run([*map(str, cmd), "--quiet"], env=launch_env(), cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def srun(env: dict, *args, cwd=REPO, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run(["srun", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"srun failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.mark.slow
def test_zero3_training_under_srun_equals_the_launchers(slurm, tiny_study, tmp_path):
    from transformers import AutoModelForCausalLM

    params, _, _ = tiny_study
    p = zero3_params(params, tmp_path, steps=2)
    env = {**launch_env(), "SLURM_CONF": slurm["SLURM_CONF"]}
    train = ["train", "--config", p, "--arm", "nft", "--seed", "0", "--quiet"]
    srun(env, "-n", 2, "-c", 1, sys.executable, "-m", "nft.cli", *train, "--out", tmp_path / "srun")
    launch("--module", "nft.cli", *train, "--out", tmp_path / "launcher")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "srun" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "launcher" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "srun" / "tags.json").read_text().count('"processes": "2"') == 1


def slurm_params(params, tmp_path, slurm: dict, **train) -> Path:
    """The tiny study's params with ``study.slurm`` (logs under ``tmp_path``) and these train keys."""
    cfg = yaml.safe_load(Path(params).read_text())
    cfg["study"] = {**cfg.get("study", {}), "launcher": "python -m nft.submit"}
    cfg["study"]["slurm"] = {"logs": str(tmp_path / "logs"), **slurm}
    cfg["train"].update(train)
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_slurm_section_is_checked_and_goes_with_its_launcher(tiny_study, tmp_path):
    params, _, _ = tiny_study
    cfg = load_study(slurm_params(params, tmp_path, {"nodes": 2, "gpus_per_node": 8, "time": "1-00:00:00"}))
    s = cfg["plan"].study.slurm
    assert (s.tasks, s.processes) == (8, 16)
    script = batch_script(s, "nft-train-nft-s0", ["train", "--config", "params.yaml"], python="/venv/bin/python")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=1-00:00:00",
        "exec srun /venv/bin/python -m nft.cli train --config params.yaml",
    ):
        assert line in script.splitlines()
    with pytest.raises(ValueError, match=r"study.slurm.time: expected minutes"):
        SlurmSection(time="tomorrow")
    with pytest.raises(ValueError, match=r"study.slurm.nodes: must be >= 1"):
        SlurmSection(nodes=0)
    bad = yaml.safe_load(Path(params).read_text())
    bad["study"] = {"slurm": {"nodes": 1}}  # the launcher left at nft: the stage would run here
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"study.launcher: 'python -m nft.submit' exactly when study.slurm is set"):
        load_study(tmp_path / "bad.yaml")
    bad["study"] = {"eval_launcher": "python -m nft.submit"}  # a job without resources
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"study.eval_launcher: 'nft', or 'python -m nft.submit' with study.slurm"):
        load_study(tmp_path / "bad.yaml")


def test_an_evaluate_job_is_one_task_on_one_node_with_its_gpus(monkeypatch, tmp_path):
    """The train job spans the section's nodes, one task per GPU; the evaluate job is one process on one node that
    sees the node's GPUs (vLLM's tensor parallelism inside it)."""
    import nft.slurm

    scripts = []

    def sbatch(cmd, input, **kw):
        scripts.append(input)
        return subprocess.CompletedProcess(cmd, 0, stdout="7\n", stderr="")

    monkeypatch.setattr(nft.slurm.subprocess, "run", sbatch)
    s = SlurmSection(nodes=2, gpus_per_node=8, logs=str(tmp_path / "logs"))
    assert nft.slurm.submit(s, ["train", "--config", "p.yaml", "--out", "runs/nft-s0"]) == 0
    assert nft.slurm.submit(s, ["evaluate", "--config", "p.yaml", "--out", "evals/nft-s0.json"]) == 0
    train, evaluate = (set(x.splitlines()) for x in scripts)
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"} <= train
    assert {"#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"} <= evaluate


def test_nft_check_without_sbatch_names_the_section(tiny_study, tmp_path, monkeypatch):
    params, _, _ = tiny_study
    p = slurm_params(params, tmp_path, {"nodes": 1})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = nft_cli("check", "--config", p, check=False, env={"PATH": str(tmp_path / "empty")})
    assert r.returncode == 1 and "study.slurm: sbatch is not on PATH" in r.stderr


def _submit(env, p, out, *, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "nft.submit",
        "train",
        "--config",
        str(p),
        "--arm",
        "nft",
        "--seed",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_job_stopped_by_sigterm_is_submitted_again_and_resumes(slurm, tiny_study, tmp_path):
    """``scancel --signal=TERM`` (what a preemption or time limit sends first) after the first rollout step: the
    run checkpoints and exits 143, the job is submitted again and resumes; its weights equal a local run's."""
    from transformers import AutoModelForCausalLM

    params, _, _ = tiny_study
    p = slurm_params(params, tmp_path, {"nodes": 1, "cpus_per_task": 1}, steps=16, val_every=0, checkpoint_every=100)
    env = {**launch_env(), "SLURM_CONF": slurm["SLURM_CONF"]}
    proc = _submit(env, p, tmp_path / "run", wait=False)
    history = tmp_path / "run" / "history.jsonl"
    deadline = time.time() + 600
    while not (history.is_file() and len(history.read_text().splitlines()) >= 2):  # step 1 done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
    subprocess.run(["scancel", "--signal=TERM", *jobs], env=env, check=True)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err
    assert "stopped after its checkpoint; submitting again (1 of 3)" in out
    logs = sorted((tmp_path / "logs").glob("nft-train-run-*.out"))
    assert len(logs) == 2 and "stopped by SIGTERM" in logs[0].read_text()
    local_train(p, "nft", tmp_path / "ref")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 16


@pytest.mark.slow
def test_a_failed_job_is_one_line_with_its_id_log_and_error(slurm, tiny_study, tmp_path):
    params, _, _ = tiny_study
    p = slurm_params(params, tmp_path, {"nodes": 1}, model=str(tmp_path / "no-model"))
    r = _submit({**launch_env(), "SLURM_CONF": slurm["SLURM_CONF"]}, p, tmp_path / "run")
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("nft slurm: nft-train-run: job ") and "failed (exit " in line
    assert "; log " in line and "no-model" in line


@pytest.mark.slow
def test_a_study_with_two_jobs_in_flight_runs_its_train_stages_as_slurm_jobs(slurm, tmp_path):
    """``make study``'s runner (JOBS=2) on a copy of the repository whose study file sets ``study.slurm``: DVC on
    this node, each train and evaluate stage a SLURM job; the pipeline ends up to date and each run's weights equal
    the same ``nft train`` run here."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import copy_checkout
    from tests.test_dvc_pipeline import SMOKE

    repo = copy_checkout(tmp_path / "repo")
    study = {"launcher": "python -m nft.submit", "eval_launcher": "python -m nft.submit", "slurm": {"nodes": 1}}
    cfg = {**SMOKE, "study": {**SMOKE["study"], **study}}
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    venv = str(Path(sys.executable).parent)
    env = {
        **launch_env(),
        "SLURM_CONF": slurm["SLURM_CONF"],
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{venv}:{os.environ['PATH']}",
    }
    r = subprocess.run(
        [
            sys.executable,
            "scripts/repro_parallel.py",
            "--jobs",
            "2",
            "--first",
            "evaluate-base",
            "--chain",
            "train",
            "evaluate",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    logs = sorted(p.name.rsplit("-", 1)[0] for p in (repo / "slurm-logs").glob("*.out"))
    assert logs == [
        "nft-evaluate-base",
        "nft-evaluate-grpo-s0",
        "nft-evaluate-nft-s0",
        "nft-train-grpo-s0",
        "nft-train-nft-s0",
    ]
    status = subprocess.run([f"{venv}/dvc", "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    for arm in ("nft", "grpo"):
        local = tmp_path / f"local-{arm}"
        local_train(repo / "params.yaml", arm, local, cwd=repo)
        a = AutoModelForCausalLM.from_pretrained(repo / "runs" / f"{arm}-s0" / "model").state_dict()
        b = AutoModelForCausalLM.from_pretrained(local / "model").state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), arm


@pytest.mark.slow
def test_sweep_workers_as_a_job_array_retry_a_preempted_trial(slurm, tiny_study, tmp_path):
    """Two Optuna workers as a SLURM job array on one storage (PostgreSQL in CI, else sqlite): array task 1 is sent
    SIGTERM (``scancel --full --signal=TERM``) mid-trial; its trial fails saying so, a copy is queued and run by
    task 0, and the study finishes."""
    import shlex

    import optuna

    from tests.test_sweep import _space

    params, _, _ = tiny_study
    space = _space(tmp_path, base={"train.steps": 8, "train.val_every": 1})
    storage = os.environ.get("NFT_TEST_PG_URL") or f"sqlite:///{tmp_path}/array.db"
    study = f"array{os.getpid()}"
    worker = [sys.executable, "-m", "nft.cli", "sweep", "--config", params, "--space", space, "--trials", 4]
    worker += ["--study-name", study, "--storage", storage, "--out-dir", tmp_path / "sweeps", "--quiet"]
    env = {**launch_env(), "SLURM_CONF": slurm["SLURM_CONF"]}
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--array=0-1",
            "--cpus-per-task=1",
            f"--output={tmp_path}/w-%A_%a.out",
            "--wrap",
            shlex.join(map(str, worker)),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    job = submitted.stdout.strip().split(";")[0]
    deadline, victim = time.time() + 300, None
    while victim is None:
        assert time.time() < deadline, "array task 1 never ran a trial"
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials()
        except Exception:  # noqa: BLE001 - the study is being created
            continue
        mine = f"slurm-{job}_1"
        # mid-trial on any machine: its first of 8 steps reported, seven to go
        victim = next(
            (
                t
                for t in trials
                if t.state.name == "RUNNING" and t.user_attrs.get("worker") == mine and t.intermediate_values
            ),
            None,
        )
    subprocess.run(["scancel", "--full", "--signal=TERM", f"{job}_1"], env=env, check=True)
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline + 600, "the array did not finish"
        time.sleep(1.0)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    dead = trials[victim.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["error"].startswith("Preempted")
    copies = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(copies) == 1 and copies[0].state.name == "COMPLETE" and copies[0].params == dead.params
    assert copies[0].user_attrs["worker"] == f"slurm-{job}_0"
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(finished) <= 5 and not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert "stopped by a signal during trial" in (tmp_path / f"w-{job}_1.out").read_text()
