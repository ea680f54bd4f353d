"""The fidelity ledger (experiments/fidelity/ledger.yaml, nft.fidelity): every preset key that differs from the defaults has
an entry; each official entry names a file:line and the tests that exist; the presets hold the official values it
records; docs/fidelity.md is generated from it. And each of these checks fails on a ledger or preset made wrong."""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml

from nft import fidelity
from tests.conftest import REPO


@pytest.fixture(scope="module")
def ledger():
    return fidelity.load()


def test_presets_hold_the_ledgers_values(ledger):
    """Complete and true: no preset key without an entry, no stale entry, no missing test, every value official."""
    assert fidelity.check(ledger) == []


def test_docs_are_generated_from_the_ledger(ledger):
    assert (REPO / "docs" / "fidelity.md").read_text() == fidelity.render(ledger), "run python -m nft.fidelity"


def _repo_copy(tmp_path, ledger, preset_text: str):
    """A repository whose 7B preset is ``preset_text`` (the 32B one as it is) beside the real tests; the ledger."""
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "paper-7b.yaml").write_text(preset_text)
    shutil.copy(REPO / "experiments" / "paper-32b.yaml", tmp_path / "experiments")
    shutil.copytree(REPO / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    return copy.deepcopy(ledger)


def test_a_new_preset_key_without_an_entry_is_named(tmp_path, ledger):
    text = (REPO / "experiments" / "paper-7b.yaml").read_text()
    led = _repo_copy(tmp_path, ledger, text)
    assert fidelity.check(led, tmp_path) == []
    raw = yaml.safe_load(text)
    raw["train"]["grad_clip"] = 0.5  # a change nobody recorded
    (tmp_path / "experiments" / "paper-7b.yaml").write_text(yaml.safe_dump(raw))
    assert fidelity.check(led, tmp_path) == [
        "paper-7b: train.grad_clip differs from the default and has no ledger entry"
    ]


def test_a_preset_value_off_the_official_one_is_named(tmp_path, ledger):
    raw = yaml.safe_load((REPO / "experiments" / "paper-7b.yaml").read_text())
    raw["train"]["lr"] = 2.0e-6
    led = _repo_copy(tmp_path, ledger, yaml.safe_dump(raw))
    assert fidelity.check(led, tmp_path) == ["paper-7b: train.lr is 2e-06, the official value is 1e-06"]


def test_missing_tests_sources_and_stale_keys_are_named(tmp_path, ledger):
    led = _repo_copy(tmp_path, ledger, (REPO / "experiments" / "paper-7b.yaml").read_text())
    entry = led["official"][0]
    entry["test"] = ["tests/train/test_fidelity.py::test_that_does_not_exist"]
    entry["source"] = "the training script"
    led["platform"]["train.no_such_key"] = "stale"
    problems = fidelity.check(led, tmp_path)
    assert f"ledger: official '{entry['setting']}': source names no file:line" in problems
    assert f"ledger: official '{entry['setting']}': test {entry['test'][0]} not found" in problems
    assert "ledger: train.no_such_key names no key of the presets" in problems
