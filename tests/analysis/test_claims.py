"""The claims report on hand-made frames: every verdict is reachable, and the numbers are the frames'."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.claims import CLAIMS, Claim, diff_interval, evaluate_claims, per_seed, verdict
from analysis.load import FINAL_COLUMNS, HISTORY_COLUMNS

BENCH = ["synth-easy", "synth-hard"]


def frames(acc: dict[str, list[float]], ent: dict[str, list[float]] | None = None, opt_steps: int = 1):
    """``final`` with each arm's per-seed accuracy (the same on both benchmarks, as a fraction) and ``history`` with
    a constant policy entropy per seed over steps 1..4 and ``opt_steps`` optimizer steps per rollout step."""
    final = [
        (f"{a}-s{s}", a, a, s, b, "avg@4", v) for a, vals in acc.items() for s, v in enumerate(vals) for b in BENCH
    ]
    hist = [
        (f"{a}-s{s}", a, a, s, step, "policy/entropy", v)
        for a, vals in (ent or {}).items()
        for s, v in enumerate(vals)
        for step in range(1, 5)
    ]
    hist += [
        (f"{a}-s{s}", a, a, s, step, "train/optimizer_steps", float(opt_steps))
        for a, vals in acc.items()
        for s in range(len(vals))
        for step in range(1, 5)
    ]
    return pd.DataFrame(hist, columns=HISTORY_COLUMNS), pd.DataFrame(final, columns=FINAL_COLUMNS)


def test_verdicts_are_read_off_the_interval():
    assert verdict("above", 0.0, 0.5, 2.0, True) == "supported"
    assert verdict("above", 0.0, -2.0, -0.5, True) == "contradicted"
    assert verdict("above", 0.0, -0.5, 2.0, True) == "inconclusive"
    assert verdict("above", 0.0, 0.5, 2.0, False) == "inconclusive"  # too few seeds
    assert verdict("above", -1.0, -0.8, 0.3, True) == "supported"  # within one point
    assert verdict("equal", 1.0, -0.4, 0.6, True) == "supported"
    assert verdict("equal", 1.0, 1.5, 3.0, True) == "contradicted"
    assert verdict("equal", 1.0, 0.2, 1.8, True) == "inconclusive"
    with pytest.raises(ValueError, match="kind"):
        verdict("below", 0.0, 0.0, 1.0, True)


def test_each_verdict_from_frames():
    acc = {
        "nft": [0.40, 0.41, 0.42],
        "rft": [0.30, 0.31, 0.32],  # clearly above: supported
        "grpo": [0.50, 0.51, 0.52],  # 10 points below GRPO: contradicted
        "dapo": [0.39, 0.43, 0.45],  # noisy, straddles -1: inconclusive
        "nft-onpolicy": [0.30, 0.31, 0.30],
        "grpo-onpolicy": [0.30, 0.30, 0.31],
    }
    history, final = frames(acc, {"nft": [0.9, 1.0, 1.1], "rft": [0.5, 0.6, 0.55]})
    rows = {r["id"]: r for r in evaluate_claims(history, final, "avg@4", BENCH)}
    assert rows["nft>rft"]["verdict"] == "supported"
    assert rows["nft>rft"]["diff"] == pytest.approx(10.0) and rows["nft>rft"]["mean_a"] == pytest.approx(41.0)
    assert rows["nft~grpo"]["verdict"] == "contradicted"
    assert rows["nft~dapo"]["verdict"] == "inconclusive"
    assert rows["entropy:nft>rft"]["verdict"] == "supported"
    assert rows["entropy:nft>rft"]["diff"] == pytest.approx(1.0 - 0.55)
    assert rows["onpolicy:nft=grpo"]["verdict"] == "supported"
    assert rows["nft>rft"]["seeds_a"] == 3 and rows["nft>rft"]["ci_low"] > 0


def test_the_on_policy_claim_needs_on_policy_runs():
    acc = {"nft-onpolicy": [0.30, 0.31, 0.30], "grpo-onpolicy": [0.30, 0.30, 0.31]}
    history, final = frames(acc, opt_steps=4)
    (row,) = [r for r in evaluate_claims(history, final, "avg@4", BENCH) if r["id"] == "onpolicy:nft=grpo"]
    assert row["verdict"] == "not run" and "not strictly on-policy" in row["note"] and "[4]" in row["note"]


def test_missing_arms_and_too_few_seeds():
    history, final = frames({"nft": [0.4, 0.5], "rft": [0.1, 0.2]})
    rows = {r["id"]: r for r in evaluate_claims(history, final, "avg@4", BENCH)}
    assert rows["nft>rft"]["verdict"] == "inconclusive" and "fewer than 3" in rows["nft>rft"]["note"]
    assert rows["nft~grpo"]["verdict"] == "not run" and "grpo" in rows["nft~grpo"]["note"]
    assert rows["entropy:nft>rft"]["verdict"] == "not run"  # no entropy logged


def test_entropy_is_the_second_half_of_training():
    hist = [("a-s0", "a", "a", 0, s, "policy/entropy", float(s)) for s in range(1, 11)]
    history = pd.DataFrame(hist, columns=HISTORY_COLUMNS)
    assert per_seed(history, None, "a", "entropy", "avg@4", BENCH) == pytest.approx([np.mean(range(6, 11))])


def test_interval_is_seeded_and_contains_the_difference():
    x, y = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.5, 1.0])
    d, lo, hi = diff_interval(x, y, seed=3)
    assert d == pytest.approx(1.5) and lo <= d <= hi
    assert diff_interval(x, y, seed=3) == (d, lo, hi)


def test_report_writes_claims_and_base_row(tmp_path):
    """The analysis stage: ``reports/claims.md``, a ``claims`` section and the base model's row with gains."""
    history, final = frames({"nft": [0.40, 0.41, 0.42], "rft": [0.30, 0.31, 0.32]})
    runs, evals = tmp_path / "runs", tmp_path / "evals"
    evals.mkdir()
    import yaml

    for (run, algo, seed), g in final.groupby(["run", "algorithm", "seed"]):
        d = runs / run
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"resolved": {"algorithm": algo, "seed": int(seed)}}))
        (d / "history.jsonl").write_text(json.dumps({"step": 1, "policy/entropy": 1.0}) + "\n")
        (d / "metrics.json").write_text("{}")
        (evals / f"{run}.json").write_text(json.dumps({b: {"avg@4": float(v)} for b, v in zip(g.benchmark, g.value)}))
    (evals / "base.json").write_text(json.dumps({"synth-easy": {"avg@4": 0.25}, "synth-hard": {"avg@4": 0.15}}))
    out = tmp_path / "reports"
    assert (
        main(
            ["--runs", str(runs), "--evals", str(evals), "--out", str(out), "--metrics", str(tmp_path / "metrics.json")]
        )
        == 0
    )
    numbers = json.loads((out / "metrics.json").read_text())
    assert numbers["arms"]["base"]["mean"] == pytest.approx(20.0)
    assert set(numbers["arms"]["base"]) >= {"mean", "std", "ci_low", "ci_high", "seeds"}
    assert numbers["arms"]["nft"]["gain_over_base"] == pytest.approx(21.0)
    assert numbers["claims"]["nft>rft"]["verdict"] == "supported"
    assert "**supported**" in (out / "claims.md").read_text()
    assert (out / "results.md").read_text().splitlines()[2].startswith("| Base model |")
    dvc = json.loads((tmp_path / "metrics.json").read_text())["avg@4"]
    assert dvc["base"]["mean"] == pytest.approx(20.0) and dvc["rft"]["gain_over_base"] == pytest.approx(11.0)


def test_claims_name_registered_arms():
    from nft.algorithms import LOSSES

    for c in CLAIMS:
        assert isinstance(c, Claim) and c.a.split("-")[0] in LOSSES and c.b.split("-")[0] in LOSSES
