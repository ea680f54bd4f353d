"""Results tables (Markdown and LaTeX): arms x benchmarks, mean ± std over seeds, entries within 1 point of the
column maximum in bold (as the paper's Table 1), and the comparison with the paper's 7B numbers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .figures import LABELS
from .stats import mean_std

#: Table 1's benchmarks, in its column order
PAPER_BENCHMARKS = ["aime24", "math500", "aime25", "amc23", "olympiadbench", "minerva"]


def paper_table_path() -> Path:
    """The paper's Table 1 as data: ``$NFT_PAPER_TABLE``, else ``../shared/paper/table1.csv`` beside the checkout."""
    env = os.environ.get("NFT_PAPER_TABLE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "paper" / "table1.csv"


#: Table 1's rows that no preset can produce, with the reason (shown as "not reproduced" in the comparison)
NOT_REPRODUCED = {
    "dpo": "the official repository (NVlabs/NFT) has no DPO script or settings, and no DPO loss is registered here",
}


def paper_rows(model: str) -> pd.DataFrame | None:
    """Table 1's rows for ``model`` (``method x benchmarks + average``, percent), or None if the file is absent."""
    path = paper_table_path()
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    rows = df[df.model == model].set_index("method")
    if rows.empty:
        raise ValueError(f"--paper-model: {model!r} not in {path} (models: {sorted(df.model.unique())})")
    return rows[PAPER_BENCHMARKS + ["average"]].astype(float)


def _metric(metric_for: dict[str, str] | str, benchmark: str) -> str:
    return metric_for if isinstance(metric_for, str) else metric_for.get(benchmark, "")


def seed_frame(final: pd.DataFrame, arm: str, metric_for: dict[str, str] | str, benchmarks: list[str]) -> pd.DataFrame:
    """``seed x benchmark`` values of one arm, in percent, indexed by seed id (every seed the arm has in
    ``final``; NaN where a seed lacks a benchmark's metric).

    Each benchmark's column is read with its own metric and the columns are joined on the seed: stacking them by
    row position would pair one seed's value with another's as soon as a seed lacks one benchmark."""
    mine = final[final.arm == arm]
    cols = {}
    for b in benchmarks:
        sub = mine[(mine.benchmark == b) & (mine.metric == _metric(metric_for, b))]
        cols[b] = sub.groupby("seed")["value"].mean() * 100
    seeds = pd.Index(sorted(mine.seed.unique()), name="seed")
    return pd.DataFrame(cols, index=seeds, columns=benchmarks, dtype=float)


def seed_gaps(final: pd.DataFrame, metric_for: dict[str, str] | str, benchmarks: list[str]) -> list[str]:
    """One line per arm whose seeds lack some benchmark: which seed lacks which, and that the average column
    leaves those seeds out (for the summary's problems)."""
    lines = []
    for arm in sorted(final.arm.unique()):
        frame = seed_frame(final, arm, metric_for, benchmarks)
        missing = [
            f"seed {s} has no {', '.join(f'{b} {_metric(metric_for, b)}' for b in frame.columns[row.isna()])}"
            for s, row in frame.iterrows()
            if row.isna().any()
        ]
        if missing:
            complete = int((~frame.isna().any(axis=1)).sum())
            lines.append(
                f"{arm}: {'; '.join(missing)}; left out of the average column (mean over the {complete} "
                f"seed(s) with every benchmark)"
            )
    return lines


def results_table(
    final: pd.DataFrame, metric_for: dict[str, str] | str, benchmarks: list[str] | None = None
) -> pd.DataFrame:
    """``arm x (benchmarks + average)`` with columns ``mean``/``std``/``n`` per cell, in percent.

    ``metric_for``: one metric name for all benchmarks, or a per-benchmark mapping (avg@32 vs avg@1). A benchmark's
    cell uses every seed that has it; the average uses only the seeds that have every benchmark (a seed's average
    over fewer benchmarks is another quantity), matched by seed id; :func:`seed_gaps` names the seeds left out."""
    benchmarks = benchmarks or sorted(final.benchmark.unique())
    rows = []
    for arm in sorted(final.arm.unique()):
        row = {"arm": arm}
        frame = seed_frame(final, arm, metric_for, benchmarks)
        for b in benchmarks:
            col = frame[b].to_numpy()
            mu, sd = mean_std(col)
            row[(b, "mean")], row[(b, "std")], row[(b, "n")] = mu, sd, int(np.sum(~np.isnan(col)))
        if benchmarks:
            complete = frame.dropna().to_numpy()
            mu, sd = mean_std(complete)
            row[("average", "mean")], row[("average", "std")] = mu, sd
            row[("average", "n")] = len(complete)
        rows.append(row)
    df = pd.DataFrame(rows).set_index("arm")
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    return df


def bold_mask(table: pd.DataFrame, tol: float = 1.0) -> pd.DataFrame:
    """True where a cell's mean is within ``tol`` points of its column's maximum."""
    means = table.xs("mean", axis=1, level=1)
    return means.ge(means.max(axis=0) - tol) & means.notna()


def _cell(mu: float, sd: float, bold: bool, latex: bool) -> str:
    if np.isnan(mu):
        return "–"
    text = f"{mu:.1f} ± {sd:.1f}" if not latex else f"{mu:.1f} $\\pm$ {sd:.1f}"
    if bold:
        return f"**{text}**" if not latex else f"\\textbf{{{text}}}"
    return text


def _name(arm: str) -> str:
    algo = arm.split("[")[0]
    return LABELS.get(algo, algo) + arm[len(algo) :]


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(dict.fromkeys(table.columns.get_level_values(0)))
    bold = bold_mask(table)
    lines = ["| arm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for arm in table.index:
        cells = [
            _cell(table.loc[arm, (c, "mean")], table.loc[arm, (c, "std")], bool(bold.loc[arm, c]), False) for c in cols
        ]
        lines.append(f"| {_name(arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    cols = list(dict.fromkeys(table.columns.get_level_values(0)))
    bold = bold_mask(table)
    head = " & ".join(["Arm"] + [c.replace("_", "\\_") for c in cols]) + " \\\\"
    body = []
    for arm in table.index:
        cells = [
            _cell(table.loc[arm, (c, "mean")], table.loc[arm, (c, "std")], bool(bold.loc[arm, c]), True) for c in cols
        ]
        body.append(" & ".join([_name(arm).replace("_", "\\_")] + cells) + " \\\\")
    return (
        "\\begin{tabular}{l"
        + "c" * len(cols)
        + "}\n\\toprule\n"
        + head
        + "\n\\midrule\n"
        + "\n".join(body)
        + "\n\\bottomrule\n\\end{tabular}\n"
    )


def _interval(
    final: pd.DataFrame, arm: str, metric_for, benchmarks: list[str], seed: int
) -> dict[str, tuple[float, float, float, int]]:
    """Per benchmark and ``average``: ``(mean, low, high, seeds)`` in percent. Three seeds or more: a percentile
    bootstrap over seeds; fewer: mean ± 1.96 standard errors over questions (the evaluation's ``stderr``)."""
    from .stats import stratified_bootstrap_ci

    frame = seed_frame(final, arm, metric_for, benchmarks)
    se = seed_frame(final, arm, "stderr", benchmarks) if (final.metric == "stderr").any() else None
    out = {}
    cols = {b: frame[b].dropna().to_numpy() for b in benchmarks}
    cols["average"] = frame.dropna().mean(axis=1).to_numpy()
    for b, vals in cols.items():
        n = len(vals)
        if not n:
            out[b] = (np.nan, np.nan, np.nan, 0)
        elif n >= 3:
            point, lo, hi = stratified_bootstrap_ci(vals[:, None], seed=seed)
            out[b] = (point, lo, hi, n)
        else:
            if se is None:
                half = np.nan
            elif b == "average":
                half = 1.96 * float(np.sqrt((se.mean(axis=0) ** 2).sum())) / len(benchmarks) / np.sqrt(n)
            else:
                half = 1.96 * float(se[b].mean()) / np.sqrt(n)
            out[b] = (float(vals.mean()), float(vals.mean() - half), float(vals.mean() + half), n)
    return out


def paper_comparison(
    final: pd.DataFrame, metric_for, benchmarks: list[str], model: str = "Qwen2.5-Math-7B", seed: int = 0
) -> str | None:
    """The study beside the paper's Table 1 (read from :func:`paper_table_path`), benchmark by benchmark: this
    study's mean with its 95% interval, the paper's value, the difference and whether the paper's value lies inside
    the interval. Arms are matched to the paper's rows by name (``base``, ``nft``, ``grpo``, ...). None unless the
    study evaluated all six of the paper's benchmarks (or the table file is absent)."""
    if not set(PAPER_BENCHMARKS) <= set(benchmarks):
        return None
    paper = paper_rows(model)
    if paper is None:
        return None
    lines = [
        "| arm | benchmark | this study [95% CI] | seeds | paper | difference | paper inside the interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in sorted(final.arm.unique(), key=lambda v: (v != "base", v)):
        if arm not in paper.index:
            continue
        iv = _interval(final, arm, metric_for, PAPER_BENCHMARKS, seed)
        for b in PAPER_BENCHMARKS + ["average"]:
            mu, lo, hi, n = iv[b]
            ref = float(paper.loc[arm, b])
            inside = "–" if np.isnan(lo) else ("yes" if lo <= ref <= hi else "no")
            lines.append(
                f"| {_name(arm)} | {b} | {mu:.1f} [{lo:.1f}, {hi:.1f}] | {n} | {ref:.1f} | {mu - ref:+.1f} | {inside} |"
            )
    for method in paper.index:
        if method not in set(final.arm):
            why = NOT_REPRODUCED.get(method, "not an arm of this study")
            ref = float(paper.loc[method, "average"])
            lines.append(f"| {_name(method)} | average | not reproduced: {why} | 0 | {ref:.1f} | – | – |")
    return "\n".join(lines) + "\n"


def paper_bars(table: pd.DataFrame, model: str = "Qwen2.5-Math-7B"):
    """Figure 1's layout: per benchmark (Table 1's order, then the average) one bar per arm of this study that the
    paper also ran, beside the paper's value (hatched). None without the paper's benchmarks or its table."""
    import matplotlib.pyplot as plt

    from .figures import COLORS

    cols = PAPER_BENCHMARKS + ["average"]
    if not set(PAPER_BENCHMARKS) <= set(table.columns.get_level_values(0)):
        return None
    paper = paper_rows(model)
    if paper is None:
        return None
    arms = [v for v in table.index if v in paper.index]
    if not arms:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.0), dpi=150, layout="constrained")
    width = 0.8 / (2 * len(arms))
    x = np.arange(len(cols))
    for i, arm in enumerate(arms):
        ours = [table.loc[arm, (c, "mean")] for c in cols]
        theirs = [paper.loc[arm, c] for c in cols]
        color = COLORS.get(arm, "#333333")
        ax.bar(x - 0.4 + (2 * i + 0.5) * width, ours, width, color=color, label=f"{_name(arm)} (this study)")
        ax.bar(
            x - 0.4 + (2 * i + 1.5) * width,
            theirs,
            width,
            color=color,
            alpha=0.35,
            hatch="//",
            label=f"{_name(arm)} (paper)",
        )
    ax.set_xticks(x, ["AIME24", "MATH500", "AIME25", "AMC23", "Olympiad", "Minerva", "Average"], fontsize=7)
    ax.set_ylabel("accuracy (%)", fontsize=8)
    ax.set_title(f"This study vs the paper's Table 1 ({model})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=6, frameon=False, loc="outside right center")
    return fig
