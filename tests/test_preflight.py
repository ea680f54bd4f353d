"""`nft check` refuses, before any stage runs, each thing a GPU run would otherwise fail on later: one clear line
naming the key or file, exit 1, nothing written."""

from __future__ import annotations

import importlib.metadata
import shutil

import pytest
import yaml

from nft.cli import main
from nft.preflight import launcher_world
from tests.conftest import REPO, TINY

DEEPSPEED = ("train.engine=deepspeed", f"train.deepspeed_config={REPO / 'experiments' / 'deepspeed' / 'zero2.json'}")


@pytest.fixture
def study(tmp_path, tiny_study):
    """A study file whose base model is a hub-format folder (the tiny study's), and a function that checks it."""
    _, _, base = tiny_study
    model = tmp_path / "hub-model"
    shutil.copytree(base, model)
    cfg = {
        **TINY,
        "pretrain": {**TINY["pretrain"], "base_model": str(model)},
        "train": {**TINY["train"], "model": str(model)},
    }

    def check(*sets: str, args: tuple = (), **kw) -> tuple[int, list[str]]:
        params = tmp_path / "study.yaml"
        params.write_text(yaml.safe_dump(cfg))
        before = sorted(p.name for p in tmp_path.rglob("*"))
        capsys = kw["capsys"]
        capsys.readouterr()
        rc = main(["check", "--config", str(params), *[a for s in sets for a in ("--set", s)], *args])
        err = capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
        return rc, [ln for ln in err.splitlines() if ln.strip()]

    return model, check


def test_a_valid_study_passes(study, capsys):
    _, check = study
    assert check(capsys=capsys) == (0, [])


@pytest.mark.parametrize(
    "remove, says",
    [
        (None, "not found"),
        ("config.json", "lacks config.json"),
        ("tokenizer.json", "lacks a tokenizer"),
        ("model.safetensors", "lacks weights"),
    ],
)
def test_a_model_folder_missing_or_incomplete(study, capsys, remove, says):
    model, check = study
    if remove:
        (model / remove).unlink()
        for extra in ("vocab.json",) if remove == "tokenizer.json" else ():
            (model / extra).unlink()
    else:
        shutil.rmtree(model)
    rc, lines = check(capsys=capsys)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("nft check: pretrain.base_model: model folder")
    assert says in lines[0] and str(model) in lines[0]


def test_train_model_must_be_the_base_model(study, capsys, tiny_study):
    _, check = study
    rc, lines = check(f"train.model={tiny_study[2]}", capsys=capsys)
    assert rc == 1 and len(lines) == 1 and "train.model:" in lines[0] and "pretrain.base_model" in lines[0]


def test_missing_benchmark_and_training_files(study, capsys, tmp_path):
    _, check = study
    empty = tmp_path / "bench"
    empty.mkdir()
    rc, lines = check(f"study.benchmarks_dir={tmp_path / 'nowhere'}", "eval.benchmarks=[math500]", capsys=capsys)
    assert rc == 1 and len(lines) == 1 and "study.benchmarks_dir:" in lines[0] and "not found" in lines[0]
    rc, lines = check(
        f"study.benchmarks_dir={empty}",
        "eval.benchmarks=[math500, aime25]",
        "train.train_set=dapo-math-17k",
        capsys=capsys,
    )
    assert rc == 1 and len(lines) == 3
    assert "dapo-math-17k needs" in lines[0] and "dapo_math_17k.parquet" in lines[0]
    assert "aime25 needs" in lines[2] and "test2025-I.jsonl" in lines[2] and "test2025-II.jsonl" in lines[2]


def test_missing_benchmarks_dir_from_the_environment(study, capsys, tmp_path, monkeypatch):
    _, check = study
    monkeypatch.setenv("NFT_BENCHMARKS_DIR", str(tmp_path / "nowhere"))
    rc, lines = check("eval.benchmarks=[math500]", capsys=capsys)
    assert rc == 1 and len(lines) == 1 and "NFT_BENCHMARKS_DIR" in lines[0] and "nowhere" in lines[0]


def test_a_batch_the_world_size_does_not_divide(study, capsys):
    _, check = study
    rc, lines = check("study.launcher=deepspeed --num_gpus 3 --module nft.cli", *DEEPSPEED, capsys=capsys)
    assert rc == 1 and len(lines) == 1
    assert "train.prompts_per_step (4) must be divisible by the 3 training processes (study.launcher)" in lines[0]
    rc, lines = check(args=("--processes", "3"), capsys=capsys)
    assert rc == 1 and "divisible by the 3 training processes (--processes)" in lines[0]


def test_a_launcher_asking_for_more_gpus_than_the_machine_has(study, capsys, monkeypatch):
    import torch

    _, check = study
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    rc, lines = check(
        "study.launcher=deepspeed --num_gpus 8 --module nft.cli", *DEEPSPEED, "train.prompts_per_step=8", capsys=capsys
    )
    assert rc == 1 and lines == [
        "nft check: study.launcher: asks for 8 GPUs per node ('deepspeed --num_gpus 8 "
        "--module nft.cli') but this machine has 4"
    ]


def test_vllm_and_torch_outside_the_tested_pairs(study, capsys, monkeypatch):
    _, check = study
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda d: {"vllm": "0.33.0", "torch": "2.13.0+cpu"}.get(d) or real(d)
    )
    rc, lines = check("train.sampler=vllm", capsys=capsys)
    assert rc == 1 and len(lines) == 1
    assert "vllm 0.33.0 with torch 2.13.0 is not a tested pair (vllm 0.32.0 with torch 2.13.0)" in lines[0]


def test_stages_at_once_with_launchers_that_take_the_machine(study, capsys):
    _, check = study
    launcher = "study.launcher=deepspeed --num_gpus 1 --module nft.cli"
    rc, lines = check(launcher, *DEEPSPEED, args=("--jobs", "2"), capsys=capsys)
    assert rc == 1 and len(lines) == 1 and "JOBS=2" in lines[0] and "JOBS=1" in lines[0]
    assert check(args=("--jobs", "2"), capsys=capsys)[0] == 0  # `nft` alone: one process, two at once are fine


def test_launcher_world():
    assert launcher_world("nft") == (1, 0)
    assert launcher_world("deepspeed --num_gpus 8 --module nft.cli") == (8, 8)
    assert launcher_world("deepspeed --hostfile h --num_nodes 2 --num_gpus 8 --module nft.cli") == (16, 8)
    assert launcher_world("torchrun --nnodes=2 --nproc_per_node=4 -m nft.cli") == (8, 4)


def test_every_gpu_preset_fits_its_launcher():
    """Each GPU preset's batch divides its launcher's processes, and its runs load the base model."""
    from nft.config import load_study
    from nft.preflight import model_folder

    for name, gpus in (("paper-7b", 8), ("paper-32b", 16), ("small-1gpu", 1)):
        cfg = load_study(REPO / "experiments" / f"{name}.yaml")
        world, _ = launcher_world(cfg["plan"].study.launcher)
        assert world == gpus and cfg["train"].prompts_per_step % world == 0
        assert cfg["train"].model == cfg["pretrain"].base_model
        assert "not found" in model_folder(cfg["train"].model, "train.model")[0]
