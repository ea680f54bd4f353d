"""The typed study file: one source of defaults (the dataclasses), presets by composition, one validation pass with
errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from nft.config import STUDY_KEYS, ConfigError, StudyConfig, _sections, compose_study, load_study
from tests.conftest import REPO, nft_cli

PRESETS = sorted((REPO / "experiments").glob("*.yaml"))


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def test_params_yaml_sets_nothing_the_defaults_do_not_say():
    """params.yaml lists every key DVC tracks, each equal to its dataclass default: the defaults live in one place."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    differ = []
    for name, cls in _sections().items():
        defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
        differ += [
            f"{name}.{k}: {v!r} != {defaults[k]!r}" for k, v in (raw.get(name) or {}).items() if defaults.get(k) != v
        ]
    plan = {f.name: _default(f) for f in dataclasses.fields(StudyConfig)}
    differ += [f"{k}: {raw[k]!r}" for k in ("arms", "seeds") if raw[k] != plan[k]]
    assert not differ, "params.yaml differs from the dataclass defaults: " + "; ".join(differ)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_presets_compose_and_round_trip(preset, tmp_path):
    composed = compose_study(preset)
    assert set(STUDY_KEYS) <= set(composed) and set(_sections()) <= set(composed)
    out = tmp_path / "params.yaml"
    nft_cli("compose", preset, "--out", out)
    assert compose_study(out) == composed  # the written file is the preset, every key explicit


def test_ablation_presets_state_only_what_differs():
    for name in ("ablation-eps", "ablation-omega"):
        raw = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())
        assert set(raw) <= set(STUDY_KEYS) | {"train"}, raw.keys()


def _study(tmp_path: Path, **top) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(top))
    return p


@pytest.mark.parametrize(
    "top, key",
    [
        ({"arms": ["nft", "ppo"]}, "arms: unknown ['ppo']"),
        ({"arms": []}, "arms: expected a non-empty list"),
        ({"seeds": [0, "one"]}, "seeds[1]: expected an integer"),
        ({"arm_settings": {"v": {"algorithm": "nft", "loss": {"epsilon": 1}}}}, "arm_settings.v.loss: "),
        ({"arm_settings": {"v": {"algorithm": "ppo"}}}, "arm_settings.v.algorithm: unknown 'ppo'"),
        ({"arm_settings": {"v": {"algorithm": "nft", "lr": 1}}}, "unknown key(s) arm_settings.v.lr"),
        ({"study": {"name": "x", "owner": "me"}}, "unknown key(s) study.owner"),
        (
            {"arm_settings": {"v": {"algorithm": "nft", "train": {"lrr": 1}}}},
            "arm_settings.v.train: unknown key(s) ['lrr']",
        ),
        (
            {"arm_settings": {"v": {"algorithm": "nft", "train": {"mini_batch_prompts": 999}}}},
            "arm_settings.v.train.mini_batch_prompts (999) exceeds train.prompts_per_step",
        ),
        (
            {"arm_settings": {"v": {"algorithm": "nft", "train": {"lr": "big"}}}},
            "arm_settings.v.train.lr: expected a number",
        ),
        ({"sweep": {}}, "unknown section(s) ['sweep']"),
        ({"train": {"checkpoint_every": 0}}, "train.checkpoint_every: must be >= 1, got 0"),
        ({"train": {"val_every": -1}}, "train.val_every: must be >= 0, got -1"),
    ],
)
def test_bad_top_level_keys_name_the_key(tmp_path, top, key):
    with pytest.raises(ConfigError) as e:
        load_study(_study(tmp_path, **top))
    assert key in str(e.value) and "params.yaml" in str(e.value)


def test_named_arm_merges_its_loss_into_train(tmp_path):
    cfg = load_study(
        _study(
            tmp_path,
            arms=["x"],
            train={"loss": {"nft": {"eps": 0.5, "omega": "one"}}},
            arm_settings={"x": {"algorithm": "nft", "loss": {"eps": 0.25}}},
        )
    )
    algo, train = cfg["plan"].arm("x", cfg["train"])
    assert algo == "nft" and train.loss["nft"] == {"eps": 0.25, "omega": "one"}
    assert cfg["plan"].arm("grpo", cfg["train"]) == ("grpo", cfg["train"])


def test_named_arm_sets_its_own_train_keys(tmp_path):
    """The default study's strictly on-policy pair: one optimizer step per rollout step, GRPO-equivalent weights,
    half the steps of the other arms (a short pair)."""
    cfg = load_study(REPO / "params.yaml")
    for arm in ("nft-onpolicy", "grpo-onpolicy"):
        algo, train = cfg["plan"].arm(arm, cfg["train"])
        assert train.mini_batch_prompts == train.prompts_per_step and train.batch_rule == "dynamic"
        assert train.lr == cfg["train"].lr and train.steps == 30 < cfg["train"].steps
    assert cfg["plan"].arm("nft-onpolicy", cfg["train"])[1].loss["nft"]["omega"] == "sqrt"
    assert cfg["plan"].arm("nft", cfg["train"])[1] == cfg["train"]


def test_check_asks_params_yaml_for_what_dvc_reads(tmp_path):
    """dvc.yaml reads each arm's `arm_settings` entry from params.yaml: `nft check` names a missing one there; a preset
    (composed before DVC reads it) needs none."""
    study = {"arms": ["nft"], "seeds": [0]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(study))
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(study))
    r = nft_cli("check", "--config", tmp_path / "params.yaml", check=False)
    assert r.returncode == 2 and "arm_settings.nft" in r.stderr
    nft_cli("check", "--config", tmp_path / "preset.yaml")
    nft_cli("compose", tmp_path / "preset.yaml", "--out", tmp_path / "params.yaml")
    nft_cli("check", "--config", tmp_path / "params.yaml")


def test_nft_processes_tune_malloc_unless_the_environment_does():
    """Every nft process sets glibc's malloc thresholds (nft.cli.tune_malloc); thresholds given in the environment
    win. Run in fresh interpreters: the setting is process-wide."""
    import os
    import subprocess
    import sys

    code = "from nft.cli import tune_malloc; print(tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = lambda extra: subprocess.run(
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.strip()
    assert run({}) == "True"  # glibc (Linux)
    assert run({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"
