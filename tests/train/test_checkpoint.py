"""Checkpoint integrity without a model: the manifest, the rotation of the last two, a full disk mid-write, and the
fallback order (fast; the end-to-end fallbacks are in test_loop.py)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from nft.dist import Dist
from nft.io import atomic_write_json
from nft.train import checkpoint as ck
from nft.train.seeds import Cursor
from tests.conftest import nft_cli


class _Engine:
    dist = Dist()

    def save_model(self, path: Path, tokenizer) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"w" * 64)

    def save_state(self, path: Path) -> dict:
        return {"optimizer": {"lr": 1.0}}


def _save(run: Path, step: int) -> None:
    ck.save_checkpoint(run, None, _Engine(), Cursor(10, 0), step)


def test_manifest_and_the_last_two(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "checkpoint.prev" / "manifest.json").read_text())["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.prev"]
    assert ck.check_manifest(tmp_path / "checkpoint") is None
    (tmp_path / "checkpoint" / "model" / "model.safetensors").write_bytes(b"x" * 64)  # same size, other bytes
    assert "fails its sha256" in ck.check_manifest(tmp_path / "checkpoint")
    assert ck.usable_checkpoint(tmp_path) == tmp_path / "checkpoint.prev"
    assert (tmp_path / "checkpoint.bad-0").is_dir()


def test_full_disk_mid_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert ck.usable_checkpoint(tmp_path) == tmp_path / "checkpoint"  # step 1, intact
    assert json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())["step"] == 1
    assert not (tmp_path / "checkpoint.prev").exists()
    _save(tmp_path, 2)  # the next checkpoint replaces the half-built staging folder
    assert json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())["step"] == 2


def test_full_disk_mid_result_write_keeps_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    atomic_write_json(out, {"avg@4": 0.5})

    def full(self, data, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        atomic_write_json(out, {"avg@4": 0.9})
    monkeypatch.undo()
    assert json.loads(out.read_text()) == {"avg@4": 0.5} and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_no_checkpoint_left_means_a_fresh_start(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "checkpoint" / "manifest.json").unlink()
    assert ck.usable_checkpoint(tmp_path) is None and (tmp_path / "checkpoint.bad-0").is_dir()
    assert not ck.has_checkpoint(tmp_path)


def test_disk_full_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """`nft` turns a full disk into one line naming it (no traceback), exit code 1."""
    import nft.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoint"))

    monkeypatch.setattr(cli, "_cmd_prepare", full)
    params = tmp_path / "params.yaml"
    params.write_text("data: {train_size: 10, eval_size: 5}\n")
    assert cli.main(["prepare", "--config", str(params), "--out", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full" in err[0] and "intact" in err[0]


def test_sigterm_checkpoints_the_step_stops_and_the_rerun_resumes(tiny_study, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption notice) mid-run: the step in flight finishes, a checkpoint of it is written,
    the run stops with one line and exit status 143; the signal handlers are restored; the same command resumes it
    to the end and its weights equal an uninterrupted run's."""
    import signal

    from nft.config import load_study
    from nft.tracking import NullTracker
    from nft.train import Preempted
    from nft.train.run import run_training
    from tests.train.test_loop import _weights

    params, _, _ = tiny_study
    cfg = load_study(params, ["train.steps=3", "train.checkpoint_every=10", "train.val_every=0"])["train"]
    handler = signal.getsignal(signal.SIGTERM)

    def preempt(step, row):
        if step == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    with pytest.raises(Preempted, match=r"stopped by SIGTERM after step 1 of 3; checkpoint written to .*resume"):
        run_training(cfg, "nft", 0, run, progress=False, tracker=NullTracker(), on_validate=preempt)
    assert signal.getsignal(signal.SIGTERM) is handler
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == 1
    assert not (run / "metrics.json").exists()
    assert run_training(cfg, "nft", 0, run, progress=False, tracker=NullTracker())["steps"] == 3
    ref = run_training(cfg, "nft", 0, tmp_path / "ref", progress=False, tracker=NullTracker())
    assert ref["steps"] == 3
    a, b = _weights(run / "model"), _weights(tmp_path / "ref" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    import nft.train.run as run_mod

    def stopped(*a, **k):
        raise Preempted("train: stopped by SIGTERM after step 1 of 3; ...")

    monkeypatch.setattr(run_mod, "run_training", stopped)
    r = nft_cli("train", "--config", params, "--arm", "nft", "--seed", "0", "--out", tmp_path / "x", check=False)
    assert r.returncode == 143 and r.stderr.strip().splitlines()[-1].startswith("train: stopped by SIGTERM")


def test_checkpoints_in_a_folder_of_their_own(tiny_study, tmp_path):
    """``--checkpoints DIR`` (the pipeline's): the run folder DVC caches holds the results only; the checkpoints, in
    DIR, resume the run; a run of another configuration starts DIR afresh."""
    params, _, _ = tiny_study
    run, ckpts = tmp_path / "runs" / "nft-s0", tmp_path / "checkpoints" / "nft-s0"
    args = ["train", "--config", params, "--arm", "nft", "--seed", "0", "--quiet"]
    args += ["--out", run, "--checkpoints", ckpts]
    nft_cli(*args, "--set", "train.steps=1", "--set", "train.checkpoint_every=1")
    assert not list(run.glob("checkpoint*")) and (run / "model").is_dir() and (run / "metrics.json").is_file()
    assert torch.load(ckpts / "checkpoint" / "state.pt", weights_only=False)["step"] == 1
    assert (ckpts / "fingerprint").read_text() == (run / "fingerprint").read_text()
    (run / "metrics.json").unlink()  # as if killed after its last checkpoint: the rerun resumes from DIR
    r = nft_cli(*args, "--set", "train.steps=1", "--set", "train.checkpoint_every=1")
    assert "starting the run afresh" not in r.stderr and (run / "metrics.json").is_file()
    r = nft_cli(*args, "--set", "train.steps=1", "--set", "train.checkpoint_every=1", "--set", "train.lr=0.5")
    assert "holds checkpoints of another configuration" in r.stderr
    assert (ckpts / "fingerprint").read_text() == (run / "fingerprint").read_text()
