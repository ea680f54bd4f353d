"""Results tables on hand-made frames where a seed is missing: values are matched by seed id, never by row position."""

import numpy as np
import pandas as pd
import pytest

from analysis.load import FINAL_COLUMNS, HISTORY_COLUMNS
from analysis.tables import results_table

# (arm, seed) -> accuracy on benchmarks a and b; nft seed 1 has no b, grpo has no seed 1 at all
VALUES = {
    ("nft", 0): {"a": 0.10, "b": 0.50},
    ("nft", 1): {"a": 0.20},
    ("nft", 2): {"a": 0.30, "b": 0.70},
    ("grpo", 0): {"a": 0.40, "b": 0.40},
    ("grpo", 2): {"a": 0.60, "b": 0.60},
}


def gappy_final() -> pd.DataFrame:
    """The ``final`` frame of VALUES: avg@4 everywhere, and b also as avg@1 (a benchmark with its own metric)."""
    rows = [
        (f"{v}-s{s}", v, v, s, bench, m, x)
        for (v, s), vals in VALUES.items()
        for bench, x in vals.items()
        for m in (("avg@4", "avg@1") if bench == "b" else ("avg@4",))
    ]
    return pd.DataFrame(rows[::-1], columns=FINAL_COLUMNS)  # row order must not matter either


def test_average_matches_benchmarks_by_seed_id():
    table = results_table(gappy_final(), "avg@4", ["a", "b"])
    assert table.loc["nft", ("a", "mean")] == pytest.approx(20.0) and table.loc["nft", ("a", "n")] == 3
    assert table.loc["nft", ("b", "mean")] == pytest.approx(60.0) and table.loc["nft", ("b", "n")] == 2
    # per-seed average over a and b: seed 0 -> 30, seed 2 -> 50; seed 1 lacks b and is left out (averaged over a
    # alone it would count 20 towards the average of a and b)
    assert table.loc["nft", ("average", "mean")] == pytest.approx(40.0)
    assert table.loc["nft", ("average", "std")] == pytest.approx(np.std([30.0, 50.0], ddof=1))
    assert table.loc["nft", ("average", "n")] == 2
    assert table.loc["grpo", ("average", "mean")] == pytest.approx(50.0)
    assert table.loc["grpo", ("average", "n")] == 2
    # one metric per benchmark (avg@32 vs avg@1): b's values come from another metric's rows; matched by position
    # they would pair seed 1's a with seed 2's b and average seed 2 over a alone (35)
    per_bench = results_table(gappy_final(), {"a": "avg@4", "b": "avg@1"}, ["a", "b"])
    pd.testing.assert_frame_equal(per_bench, table)


def test_missing_seeds_are_named(tmp_path):
    from analysis.__main__ import analyze
    from analysis.tables import seed_gaps

    gaps = seed_gaps(gappy_final(), "avg@4", ["a", "b"])
    assert len(gaps) == 1 and "nft" in gaps[0] and "seed 1" in gaps[0] and "b avg@4" in gaps[0]
    history = pd.DataFrame(
        [(f"{v}-s{s}", v, v, s, 1, "val/a/avg@4", vals["a"]) for (v, s), vals in VALUES.items()],
        columns=HISTORY_COLUMNS,
    )
    analyze(history, gappy_final(), [], tmp_path / "reports", "hand-made frames")
    problems = (tmp_path / "reports" / "summary.md").read_text().split("## Problems")[1]
    assert gaps[0] in problems
