"""Statistics against hand-computed cases."""

import numpy as np
import pytest

from analysis.stats import iqm, mean_std, poi_ci, probability_of_improvement, stratified_bootstrap_ci


def test_mean_std_by_hand():
    mu, sd = mean_std([[1.0, 2.0], [3.0, 4.0]])
    assert mu == 2.5 and sd == pytest.approx(np.sqrt(2.0))
    assert mean_std([[5.0, 7.0]]) == (6.0, 0.0)
    mu, sd = mean_std([[1.0, np.nan], [3.0, 5.0]])  # NaN ignored within a run
    assert mu == pytest.approx(2.5) and sd == pytest.approx(np.std([1.0, 4.0], ddof=1))


def test_iqm_by_hand():
    assert iqm(np.arange(1, 9, dtype=float).reshape(4, 2)) == 4.5  # middle half of 1..8 = 3,4,5,6
    assert iqm([[1.0], [2.0], [3.0], [100.0]]) == 2.5  # the outlier is trimmed


def test_probability_of_improvement_by_hand():
    assert probability_of_improvement([[1.0], [3.0]], [[2.0], [2.0]]) == 0.5
    assert probability_of_improvement([[2.0]], [[2.0]]) == 0.5  # ties count half
    assert probability_of_improvement([[3.0, 0.0], [4.0, 0.0]], [[1.0, 1.0], [2.0, 1.0]]) == 0.5  # (1 + 0) / 2
    with pytest.raises(ValueError):
        probability_of_improvement([[1.0, 2.0]], [[1.0]])


def test_stratified_bootstrap_is_seeded_and_exact():
    scores = np.array([[0.1, 0.5], [0.2, 0.7], [0.4, 0.6]])
    a = stratified_bootstrap_ci(scores, reps=500, seed=3)
    b = stratified_bootstrap_ci(scores, reps=500, seed=3)
    assert a == b
    # the same computation written out: runs resampled independently per task
    rng = np.random.default_rng(3)
    stats = []
    for _ in range(500):
        idx = rng.integers(0, 3, size=(3, 2))
        stats.append(np.take_along_axis(scores, idx, axis=0).mean())
    assert a[0] == pytest.approx(scores.mean())
    assert a[1] == pytest.approx(np.quantile(stats, 0.025)) and a[2] == pytest.approx(np.quantile(stats, 0.975))
    flat = stratified_bootstrap_ci(np.full((3, 2), 0.3), reps=100, seed=0)
    assert flat == pytest.approx((0.3, 0.3, 0.3))


def test_poi_ci_brackets_point():
    x = np.array([[0.6], [0.7], [0.8]])
    y = np.array([[0.5], [0.55], [0.65]])
    p, lo, hi = poi_ci(x, y, reps=300, seed=1)
    assert p == pytest.approx(8 / 9) and lo <= p <= hi
