"""Fault injection: training is killed (SIGKILL of the whole process group) at seeded random moments, resumed, and
must end bit-identical to an uninterrupted run -- history (timings aside) and weights -- for every algorithm, and for
DeepSpeed ZeRO-3 on 2 ranks under its launcher.

A kill lands wherever the clock puts it: before the first checkpoint (the rerun starts over), between checkpoints,
during a checkpoint write (the manifest is written last; a half-written checkpoint is set aside), or after the end
(nothing to resume: the rerun says so). Each case must give the same result. Marked slow: `make test-scaleout`
and CI run it."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import nft_cli
from tests.train.test_loop import _comparable, _history, _weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: every registered algorithm of the embedded study, one training seed each (so several seeds are covered)
ALGOS = {"nft": 11, "rft": 12, "grpo": 13, "dr_grpo": 14, "dapo": 15, "sft": 16}
STEPS = ["--set", "train.steps=4", "--set", "train.checkpoint_every=1"]


def _killed_at(cmd: list[str], delay: float, env=None) -> bool:
    """Start ``cmd`` in its own process group, SIGKILL the group after ``delay`` seconds; True if it was killed
    (False: it had already finished)."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


@pytest.mark.parametrize("algo", list(ALGOS))
def test_random_kills_then_resume_are_bit_identical(tiny_study, tmp_path, algo):
    params, _, _ = tiny_study
    seed = ALGOS[algo]
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    nft_cli("train", "--config", params, "--arm", algo, "--seed", seed, "--out", ref, "--quiet", *STEPS)
    duration = time.perf_counter() - t0
    run = tmp_path / "faulty"
    cmd = [
        sys.executable,
        "-m",
        "nft.cli",
        "train",
        "--config",
        str(params),
        "--arm",
        algo,
        "--seed",
        str(seed),
        "--out",
        str(run),
        "--quiet",
        *STEPS,
    ]
    rng = random.Random(f"faults-{algo}")
    kills = 0
    for i in range(3):  # three kills at seeded random moments of a run's span (each rerun resumes the last)
        delay = rng.uniform(0.05, 0.7) * duration
        killed = _killed_at(cmd, delay)
        while i == 0 and not killed:  # this run beat the reference's clock: start over and kill it sooner (so at
            shutil.rmtree(run, ignore_errors=True)  # least one kill lands, whatever the machine's speed)
            delay /= 2
            killed = _killed_at(cmd, delay)
        kills += killed
    assert kills >= 1
    nft_cli("train", "--config", params, "--arm", algo, "--seed", seed, "--out", run, "--quiet", *STEPS)
    assert (run / "metrics.json").is_file()
    assert _comparable(_history(run)) == _comparable(_history(ref)), f"{algo}: history differs after {kills} kills"
    a, b = _weights(ref / "model"), _weights(run / "model")
    assert all(torch.equal(a[k], b[k]) for k in a), f"{algo}: weights differ after {kills} kills"


def test_zero3_two_ranks_killed_and_resumed(tiny_study, tmp_path):
    """``deepspeed --num_gpus 2`` (two CPU ranks, gloo): killed after its first checkpoint, rerun: the same history
    and final model as an uninterrupted launch."""
    pytest.importorskip("deepspeed")
    from tests.train.test_deepspeed import launch, launch_cmd, launch_env, remove_shm, zero3_params

    params, _, _ = tiny_study
    p = zero3_params(params, tmp_path, steps=3, checkpoint_every=1)

    def args(out: Path) -> list:
        return ["--module", "nft.cli", "train", "--config", p, "--arm", "nft", "--seed", "5", "--out", out, "--quiet"]

    ref, run = tmp_path / "ref", tmp_path / "killed"
    launch(*args(ref))
    cmd = launch_cmd(*args(run))
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=launch_env(),
        cwd=REPO,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoint" / "manifest.json").is_file() and len(_history(run)) >= 2:  # mid-run, a checkpoint
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the launch ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    remove_shm(cmd)
    assert not (run / "metrics.json").exists()
    launch(*args(run))
    assert _comparable(_history(run)) == _comparable(_history(ref))
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(ref / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(run / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "metrics.json").read_text())
