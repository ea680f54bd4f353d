"""Shared fixtures: a tiny prepared data folder and a tiny base model that is right sometimes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nft  # noqa: F401  (pins the CPU instruction set, nft.pin_cpu_isa, before any test runs a torch kernel)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a user's own tracking server must not receive the tests' runs; each test that tracks names its store
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"

#: what `make study` and the other commands write into the checkout; tests neither read nor write them
CHECKOUT_OUTPUTS = ("data", "models", "runs", "checkpoints", "evals", "reports", "sweeps", "mlflow.db", "dvc.lock")


def _outputs_state(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the checkout's output paths."""
    state = {}
    for name in CHECKOUT_OUTPUTS:
        top = root / name
        files = [top] if top.is_file() else (p for p in top.rglob("*") if p.is_file()) if top.is_dir() else ()
        for f in files:
            st = f.stat()
            state[str(f.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


def pytest_sessionstart(session):
    session.config._nft_outputs = _outputs_state(REPO)


def pytest_sessionfinish(session, exitstatus):
    """The suite fails if it created, changed or removed anything under the checkout's outputs."""
    before = getattr(session.config, "_nft_outputs", None)
    if before is None:
        return
    after = _outputs_state(REPO)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        print(
            f"\nconftest: the tests changed the checkout's outputs ({len(changed)} files), e.g. {changed[:5]}",
            file=sys.stderr,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _away_from_checkout(tmp_path_factory, monkeypatch):
    """Every test runs in an empty working directory of its own: commands whose defaults are relative to it
    (``evals/``, ``runs/``, ``reports/``, ``mlflow.db``) never see the checkout's study."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


#: a small study: tiny model, add/sub/mul easy questions, short answers. The base model reaches ~20-40% sampled
#: accuracy on its training questions after 250 steps (~15 s), so groups with both right and wrong answers exist.
TINY = {
    "data": {"families": ["add", "sub", "mul"], "tiers": ["easy"], "train_size": 400, "eval_size": 24},
    "model": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 320,
    },
    "pretrain": {
        "steps": 250,
        "batch_size": 16,
        "warmup": 20,
        "lr": 3e-3,
        "tokenizer_corpus": 300,
        "wrong_frac": 0.0,
        "truncate_frac": 0.0,
    },
    "train": {
        "steps": 2,
        "prompts_per_step": 4,
        "answers_per_prompt": 4,
        "mini_batch_prompts": 2,
        "micro_batch_size": 6,
        "max_new_tokens": 24,
        "val_every": 0,
        "val_k": 2,
        "val_limit": 8,
        "val_benchmarks": ["synth-easy"],
        "checkpoint_every": 1,
        "grader_workers": 1,
        "lr": 1e-4,
        "tracking": False,
        "max_num_gen_batches": 4,
    },
}


def copy_checkout(dst: Path) -> Path:
    """The checkout's code and pipeline (no outputs, no DVC cache) in a fresh git repository at ``dst``."""
    import shutil

    top = {
        ".venv",
        ".git",
        "data",
        "models",
        "runs",
        "checkpoints",
        "evals",
        "reports",
        "mlflow.db",
        "tmp",
        "dvc.lock",
        "mlartifacts",
        "metrics.json",
        "sweeps",
    }
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
    return dst


def nft_cli(*args, check=True, env=None, cwd=None, process=False):
    """``nft ARGS`` in this process (``nft.cli.main``, output captured; the environment, working directory and torch's
    thread count restored afterwards), or with ``process=True`` as a child process where a process of its own is the
    point (signals, exit codes of the interpreter, a launcher). Returns a ``CompletedProcess``."""
    args = [str(a) for a in args]
    if process:
        r = subprocess.run(
            [sys.executable, "-m", "nft.cli", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
    else:
        r = _in_process(args, env, cwd)
    if check and r.returncode != 0:
        raise AssertionError(f"nft {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def _in_process(args: list[str], env: dict | None, cwd) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import traceback

    import torch

    from nft.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(args)
            except SystemExit as e:  # argparse's usage errors
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # as the interpreter reports an uncaught exception
                traceback.print_exc()
                rc = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["nft", *args], rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """(params.yaml path, data dir, base model dir) of the tiny study, built once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    data, base = root / "data", root / "base"
    params = root / "params.yaml"
    cfg = {**TINY, "train": {**TINY["train"], "model": str(base), "data": str(data)}}
    params.write_text(yaml.safe_dump(cfg))
    nft_cli("prepare", "--config", params, "--out", data)
    nft_cli("pretrain", "--config", params, "--out", base, "--quiet")
    return params, data, base


@pytest.fixture(scope="session")
def tiny_study_vllm(tmp_path_factory):
    """The tiny study with a head size vLLM's CPU kernels take (64 / 2 heads = 32; the default's 16 is refused)."""
    root = tmp_path_factory.mktemp("tiny-vllm")
    data, base = root / "data", root / "base"
    params = root / "params.yaml"
    model = {**TINY["model"], "num_heads": 2, "num_kv_heads": 1}
    cfg = {**TINY, "model": model, "train": {**TINY["train"], "model": str(base), "data": str(data)}}
    params.write_text(yaml.safe_dump(cfg))
    nft_cli("prepare", "--config", params, "--out", data)
    nft_cli("pretrain", "--config", params, "--out", base, "--quiet")
    return params, data, base
