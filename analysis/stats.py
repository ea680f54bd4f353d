"""Statistics as plain, seeded functions of ``(runs x tasks)`` arrays (rliable's definitions, Agarwal et al. 2021).

All bootstrap functions take a ``seed`` and use their own ``numpy.random.default_rng`` (rliable itself draws from
numpy's global state).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _2d(scores) -> np.ndarray:
    a = np.asarray(scores, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"scores: expected a (runs x tasks) array, got shape {a.shape}")
    return a


def mean_std(scores) -> tuple[float, float]:
    """Mean over runs of the per-run task mean, and its sample std over runs (ddof 1; 0 for one run): the paper's
    ``mean ± std over seeds``. NaN entries are ignored."""
    a = _2d(scores)
    per_run = np.nanmean(a, axis=1)
    per_run = per_run[~np.isnan(per_run)]
    if per_run.size == 0:
        return float("nan"), float("nan")
    return float(per_run.mean()), float(per_run.std(ddof=1)) if per_run.size > 1 else 0.0


def iqm(scores) -> float:
    """Interquartile mean: the mean of the middle 50% of all (run, task) scores (scipy's trim_mean, 25% each side)."""
    x = np.sort(_2d(scores).ravel())
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return float("nan")
    lo = int(np.floor(0.25 * n))
    return float(x[lo : n - lo].mean())


def aggregate_mean(scores) -> float:
    a = _2d(scores)
    return float(np.nanmean(a))


def stratified_bootstrap_ci(
    scores, statistic: Callable = aggregate_mean, reps: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(point, low, high)``: percentile interval of ``statistic`` over ``reps`` stratified bootstrap resamples
    (runs resampled with replacement independently within each task, as rliable's ``StratifiedBootstrap``)."""
    a = _2d(scores)
    rng = np.random.default_rng(seed)
    n, m = a.shape
    stats = np.empty(reps)
    for r in range(reps):
        idx = rng.integers(0, n, size=(n, m))
        stats[r] = statistic(np.take_along_axis(a, idx, axis=0))
    alpha = (1 - confidence) / 2
    return float(statistic(a)), float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def probability_of_improvement(x, y) -> float:
    """P(X > Y): per task, the probability that a random run of X beats a random run of Y (ties count 1/2), averaged
    over tasks (rliable ``probability_of_improvement``; the Mann-Whitney U statistic / (N M))."""
    a, b = _2d(x), _2d(y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y need the same tasks, got {a.shape[1]} and {b.shape[1]}")
    probs = []
    for t in range(a.shape[1]):
        xa, yb = a[:, t][~np.isnan(a[:, t])], b[:, t][~np.isnan(b[:, t])]
        if xa.size == 0 or yb.size == 0:
            continue
        gt = (xa[:, None] > yb[None, :]).mean()
        eq = (xa[:, None] == yb[None, :]).mean()
        probs.append(gt + 0.5 * eq)
    return float(np.mean(probs)) if probs else float("nan")


def poi_ci(x, y, reps: int = 2000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """Probability of improvement with a stratified bootstrap interval (X and Y runs resampled per task)."""
    a, b = _2d(x), _2d(y)
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    for r in range(reps):
        ia = rng.integers(0, a.shape[0], size=a.shape)
        ib = rng.integers(0, b.shape[0], size=b.shape)
        stats[r] = probability_of_improvement(np.take_along_axis(a, ia, 0), np.take_along_axis(b, ib, 0))
    alpha = (1 - confidence) / 2
    return probability_of_improvement(a, b), float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
