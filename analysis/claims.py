"""The paper's claims, tested on the study's own runs: a number, a bootstrap interval and a verdict for each.

Nothing here is typed by hand: every figure comes from the runs' frames (``analysis.load``). A claim compares two
arms on a per-seed quantity (the final evaluation averaged over the benchmarks, or the policy entropy averaged over
the second half of training); the difference of their means gets a percentile bootstrap interval (seeds resampled
with replacement within each arm, independently; 10,000 resamples, seeded), and the verdict reads the interval
against the claim's threshold:

- ``supported``: the whole interval is on the claim's side of the threshold;
- ``contradicted``: the whole interval is on the other side;
- ``inconclusive``: the interval straddles the threshold, or an arm has fewer than ``MIN_SEEDS`` seeds.

For an equality claim (two arms "equal") the threshold is an equivalence margin: supported when the interval lies
inside ``[-margin, margin]``, contradicted when it lies wholly outside it.

A bootstrap over three seeds is narrow (it cannot see more spread than the three values show), so the report states
the seed counts beside every interval; read "supported" at three seeds as "no contrary evidence at this size".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .tables import seed_frame

#: fewer seeds per arm than this and a claim is inconclusive whatever its interval
MIN_SEEDS = 3
#: the policy entropy of a run: mean of ``policy/entropy`` over the rollout steps of the second half of training
ENTROPY_METRIC = "policy/entropy"


@dataclass(frozen=True)
class Claim:
    """One claim of the paper, as a comparison of two arms."""

    id: str
    text: str
    a: str
    """the arm the claim is about (NFT, or its on-policy run)."""
    b: str
    quantity: str
    """``accuracy``: final evaluation, average over benchmarks (points); ``entropy``: policy entropy (nats/token)."""
    kind: str
    """``above``: a - b > threshold; ``equal``: |a - b| < threshold."""
    threshold: float
    on_policy: bool = False
    """the claim is about strictly on-policy training: read only if both arms' runs did one optimizer step per
    rollout step (``train/optimizer_steps``)."""


#: the paper's claims (Chen et al. 2026): NFT above RFT (Table 1); NFT on par with the best RL baselines, i.e. within
#: one point of GRPO and of DAPO or above them (Table 1); NFT keeps a higher entropy than RFT (Fig. 5); NFT and GRPO
#: are the same algorithm when training is strictly on-policy (Prop. 4.2; the study's ``*-onpolicy`` pair).
CLAIMS = [
    Claim("nft>rft", "NFT is more accurate than RFT", "nft", "rft", "accuracy", "above", 0.0),
    Claim("nft~grpo", "NFT is within 1 point of GRPO or above", "nft", "grpo", "accuracy", "above", -1.0),
    Claim("nft~dapo", "NFT is within 1 point of DAPO or above", "nft", "dapo", "accuracy", "above", -1.0),
    Claim("entropy:nft>rft", "NFT keeps a higher policy entropy than RFT", "nft", "rft", "entropy", "above", 0.0),
    Claim(
        "onpolicy:nft=grpo",
        "strictly on-policy, NFT and GRPO reach the same accuracy (within 1 point)",
        "nft-onpolicy",
        "grpo-onpolicy",
        "accuracy",
        "equal",
        1.0,
        on_policy=True,
    ),
]


def per_seed(
    history: pd.DataFrame, final: pd.DataFrame, arm: str, quantity: str, metric: str, benchmarks: list[str]
) -> np.ndarray:
    """One value per seed of ``arm``: its final ``metric`` averaged over ``benchmarks`` (percent; seeds lacking a
    benchmark left out), or its policy entropy averaged over the second half of its rollout steps."""
    if quantity == "accuracy":
        frame = seed_frame(final, arm, metric, benchmarks)
        return frame.dropna().mean(axis=1).to_numpy(dtype=float)
    sub = history[(history.arm == arm) & (history.metric == ENTROPY_METRIC) & (history.step > 0)]
    out = []
    for _, g in sub.dropna(subset=["value"]).groupby("seed"):
        last = g.step.max()
        out.append(float(g[g.step > last / 2].value.mean()))
    return np.asarray(out, dtype=float)


def diff_interval(
    x: np.ndarray, y: np.ndarray, reps: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(mean(x) - mean(y), low, high)``: percentile bootstrap of the difference of means, each sample resampled
    with replacement on its own."""
    rng = np.random.default_rng(seed)
    bx = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(axis=1)
    by = y[rng.integers(0, len(y), size=(reps, len(y)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    d = bx - by
    return float(x.mean() - y.mean()), float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))


def verdict(kind: str, threshold: float, lo: float, hi: float, enough: bool) -> str:
    """The verdict of an interval ``[lo, hi]`` of ``a - b`` against a claim (see the module docstring)."""
    if not enough:
        return "inconclusive"
    if kind == "above":
        return "supported" if lo > threshold else "contradicted" if hi < threshold else "inconclusive"
    if kind == "equal":
        return (
            "supported"
            if -threshold < lo and hi < threshold
            else "contradicted"
            if lo > threshold or hi < -threshold
            else "inconclusive"
        )
    raise ValueError(f"kind: expected 'above' or 'equal', got {kind!r}")


def evaluate_claims(
    history: pd.DataFrame,
    final: pd.DataFrame,
    metric: str,
    benchmarks: list[str],
    claims: list[Claim] = CLAIMS,
    seed: int = 0,
) -> list[dict]:
    """Each claim whose two arms are in the study: the arms' means, the difference with its interval, the seed
    counts and the verdict. Claims about arms the study lacks are listed with ``verdict: not run``."""
    arms = set(final.arm.unique()) | set(history.arm.unique())
    out = []
    for c in claims:
        row = {
            "id": c.id,
            "claim": c.text,
            "a": c.a,
            "b": c.b,
            "quantity": c.quantity,
            "kind": c.kind,
            "threshold": c.threshold,
        }
        if c.a not in arms or c.b not in arms:
            out.append({**row, "verdict": "not run", "note": f"the study has no {c.a if c.a not in arms else c.b} arm"})
            continue
        if c.on_policy:
            steps = history[history.arm.isin([c.a, c.b]) & (history.metric == "train/optimizer_steps")].value
            if steps.empty or (steps != 1).any():
                out.append(
                    {
                        **row,
                        "verdict": "not run",
                        "note": "the pair's runs were not strictly on-policy (optimizer "
                        f"steps per rollout step: {sorted(set(steps.astype(int))) or 'not logged'})",
                    }
                )
                continue
        x = per_seed(history, final, c.a, c.quantity, metric, benchmarks)
        y = per_seed(history, final, c.b, c.quantity, metric, benchmarks)
        if not len(x) or not len(y):
            out.append({**row, "verdict": "not run", "note": f"no {c.quantity} values for one of the arms"})
            continue
        d, lo, hi = diff_interval(x, y, seed=seed)
        enough = min(len(x), len(y)) >= MIN_SEEDS
        out.append(
            {
                **row,
                "mean_a": float(x.mean()),
                "mean_b": float(y.mean()),
                "diff": d,
                "ci_low": lo,
                "ci_high": hi,
                "seeds_a": len(x),
                "seeds_b": len(y),
                "verdict": verdict(c.kind, c.threshold, lo, hi, enough),
                **({} if enough else {"note": f"fewer than {MIN_SEEDS} seeds in an arm"}),
            }
        )
    return out


def claims_markdown(rows: list[dict], metric: str) -> str:
    """``reports/claims.md``: one line per claim."""
    unit = {"accuracy": f"points of {metric}", "entropy": "nats/token"}
    lines = [
        "# The paper's claims on this study\n",
        f"Accuracy: the final {metric} averaged over the benchmarks, per seed, in percent. Entropy: "
        f"`{ENTROPY_METRIC}` (the policy's mean token entropy over every answer it sampled) averaged over the "
        "second half of training, per seed. Interval: 95% percentile bootstrap of the difference of the arms' "
        "means (seeds resampled within each arm, 10,000 resamples). Verdict: supported / contradicted when the "
        "whole interval is on one side of the threshold, else inconclusive at this sample size (also when an arm "
        f"has fewer than {MIN_SEEDS} seeds). With 3 seeds an interval is narrow by construction: read "
        "'supported' as 'no contrary evidence at this size'.\n",
        "| claim | A | B | mean A | mean B | A − B [95% CI] | threshold | seeds | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["verdict"] == "not run":
            lines.append(f"| {r['claim']} | {r['a']} | {r['b']} | – | – | – | – | – | not run ({r['note']}) |")
            continue
        fmt = "{:.3f}" if r["quantity"] == "entropy" else "{:.1f}"
        th = f"A − B > {r['threshold']:g}" if r["kind"] == "above" else f"abs(A − B) < {r['threshold']:g}"
        lines.append(
            f"| {r['claim']} | {r['a']} | {r['b']} | {fmt.format(r['mean_a'])} | {fmt.format(r['mean_b'])} | "
            f"{fmt.format(r['diff'])} [{fmt.format(r['ci_low'])}, {fmt.format(r['ci_high'])}] "
            f"({unit[r['quantity']]}) | {th} | {r['seeds_a']}, {r['seeds_b']} | **{r['verdict']}** |"
        )
    return "\n".join(lines) + "\n"
