"""The paper preset's own path, as a GPU researcher runs it, on CPU: `nft compose experiments/paper-7b.yaml`, changed
only in the model (a hub-format tiny Qwen2 folder), the backends (torch sampler and engine) and the sizes, then
`nft check` and `dvc repro` on the real DAPO-Math-17k and the six benchmark files, ending in Table 1's layout with a
base row beside the paper's numbers. Replacing the model folder's weights puts every run out of date."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHARED_BENCHMARKS, TINY, copy_checkout, nft_cli

PAPER_TABLE = REPO.parent / "shared" / "paper" / "table1.csv"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason=f"{SHARED_BENCHMARKS} absent"),
]

SMALL_SETS = {"aime24": 2, "aime25": 2, "amc23": 2}  # the preset's avg@32, scaled down


def scaled_down(model: Path) -> list[str]:
    """The overrides of the CPU run: the model, the backends, the sizes; everything else is the preset's."""
    sets = {
        "study.launcher": "nft",
        "study.benchmarks_dir": str(SHARED_BENCHMARKS),
        "arms": "[nft, dapo]",
        "seeds": "[0]",
        "pretrain.base_model": str(model),
        "train.model": str(model),
        "train.sampler": "torch",
        "train.engine": "torch",
        "eval.sampler": "torch",
        "train.steps": 2,
        "train.prompts_per_step": 2,
        "train.answers_per_prompt": 2,
        "train.mini_batch_prompts": 1,
        "train.gen_batch_prompts": 4,
        "train.max_num_gen_batches": 2,
        "train.short_batch": "train",  # a tiny model solves no DAPO question: no mixed group to keep
        "train.max_new_tokens": 12,
        "train.val_every": 2,
        "train.val_limit": 2,
        "train.val_k_per_benchmark": json.dumps(SMALL_SETS),
        "train.grader_workers": 1,
        "eval.k_per_benchmark": json.dumps(SMALL_SETS),
        "eval.limit": 2,
        "eval.max_new_tokens": 12,
        "eval.workers": 1,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def _run(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "NFT_PAPER_TABLE": str(PAPER_TABLE),
    }
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory) -> Path:
    """A hub-format (save_pretrained) tiny Qwen2: config, weights, a byte-level BPE tokenizer with a chat template."""
    root = tmp_path_factory.mktemp("hub")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({**TINY, "pretrain": {**TINY["pretrain"], "steps": 5}}))
    nft_cli("prepare", "--config", params, "--out", root / "data")
    nft_cli("pretrain", "--config", params, "--out", root / "Qwen2-tiny", "--quiet")
    model = root / "Qwen2-tiny"
    assert "chat_template" in json.loads((model / "tokenizer_config.json").read_text())
    return model


def test_paper_preset_runs_end_to_end_on_cpu(tmp_path, hub_model):
    repo = copy_checkout(tmp_path / "repo")
    _run(
        repo,
        "nft",
        "compose",
        "experiments/paper-7b.yaml",
        "--out",
        "params.yaml",
        *[a for s in scaled_down(hub_model) for a in ("--set", s)],
    )
    _run(repo, "nft", "check", "--config", "params.yaml")
    r = _run(repo, "dvc", "repro")
    ran = {ln.split("'")[1] for ln in r.stdout.splitlines() if ln.startswith("Running stage")}
    assert ran == {
        "prepare",
        "base",
        "evaluate-base",
        "train@nft-0",
        "train@dapo-0",
        "evaluate@nft-0",
        "evaluate@dapo-0",
        "analyze",
    }

    six = ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    base = json.loads((repo / "evals" / "base.json").read_text())
    assert set(six) <= set(base) and "avg@2" in base["aime24"] and "avg@1" in base["math500"]
    meta = json.loads((repo / "evals" / "base.meta.json").read_text())
    assert Path(meta["model"]) == hub_model  # the base row is the folder the runs load
    ref = json.loads((repo / "models" / "base" / "reference.json").read_text())
    assert Path(ref["base_model"]) == hub_model.resolve()
    for run in ("nft-s0", "dapo-s0"):
        history = [json.loads(x) for x in (repo / "runs" / run / "history.jsonl").read_text().splitlines()]
        assert any("val/aime24/avg@2" in h and "val/math500/avg@1" in h for h in history)  # the six, validated
        assert set(six) <= set(json.loads((repo / "evals" / f"{run}.json").read_text()))
    summary = (repo / "reports" / "summary.md").read_text()
    assert "Against the paper (Qwen2.5-Math-7B, Table 1)" in summary
    against = summary.split("Against the paper")[1]
    for arm, paper in (("Base model", "13.3"), ("NFT", "32.0"), ("DAPO", "33.1")):  # the paper's AIME24 column
        assert re.search(rf"\| {arm} \| aime24 \| [\d.]+ \[[\d.]+, [\d.]+\] \| 1 \| {paper} \|", against), arm
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert any(d["path"] == str(hub_model) for d in lock["train@nft-0"]["deps"])  # DVC hashed the model folder

    # new weights in the model folder: the base row and every run are out of date, nothing else
    from safetensors.torch import load_file, save_file

    weights = load_file(str(hub_model / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(hub_model / "model.safetensors"), metadata={"format": "pt"})
    status = _run(repo, "dvc", "status").stdout
    stale = {ln.rstrip(":") for ln in status.splitlines() if ln and not ln[0].isspace() and ln.endswith(":")}
    assert stale == {"evaluate-base", "train@nft-0", "train@dapo-0"}, status
