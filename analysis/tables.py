"""Results tables (Markdown and LaTeX): benchmarks x algorithms, mean ± std over seeds, entries within 1 point of the
column maximum in bold (as the paper's Table 1), and the comparison with the paper's 7B numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .figures import LABELS
from .stats import mean_std

#: Table 1 of the paper (Qwen2.5-Math-7B), average over the six benchmarks, in percent (as quoted in the issue
#: tracker). Per-benchmark entries are left out rather than guessed: add them from the paper's Table 1 to compare
#: benchmark by benchmark.
PAPER_7B_AVERAGE = {"nft": 51.7, "dapo": 51.2, "grpo": 49.5, "dr_grpo": 49.8, "rft": 48.3}
PAPER_BENCHMARKS = ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]


def _metric(metric_for: dict[str, str] | str, benchmark: str) -> str:
    return metric_for if isinstance(metric_for, str) else metric_for.get(benchmark, "")


def seed_frame(final: pd.DataFrame, variant: str, metric_for: dict[str, str] | str, benchmarks: list[str]
               ) -> pd.DataFrame:
    """``seed x benchmark`` values of one variant, in percent, indexed by seed id (every seed the variant has in
    ``final``; NaN where a seed lacks a benchmark's metric).

    Each benchmark's column is read with its own metric and the columns are joined on the seed: stacking them by
    row position would pair one seed's value with another's as soon as a seed lacks one benchmark."""
    mine = final[final.variant == variant]
    cols = {}
    for b in benchmarks:
        sub = mine[(mine.benchmark == b) & (mine.metric == _metric(metric_for, b))]
        cols[b] = sub.groupby("seed")["value"].mean() * 100
    seeds = pd.Index(sorted(mine.seed.unique()), name="seed")
    return pd.DataFrame(cols, index=seeds, columns=benchmarks, dtype=float)


def seed_gaps(final: pd.DataFrame, metric_for: dict[str, str] | str, benchmarks: list[str]) -> list[str]:
    """One line per variant whose seeds lack some benchmark: which seed lacks which, and that the average column
    leaves those seeds out (for the summary's problems)."""
    lines = []
    for variant in sorted(final.variant.unique()):
        frame = seed_frame(final, variant, metric_for, benchmarks)
        missing = [f"seed {s} has no {', '.join(f'{b} {_metric(metric_for, b)}' for b in frame.columns[row.isna()])}"
                   for s, row in frame.iterrows() if row.isna().any()]
        if missing:
            complete = int((~frame.isna().any(axis=1)).sum())
            lines.append(f"{variant}: {'; '.join(missing)}; left out of the average column (mean over the {complete} "
                         f"seed(s) with every benchmark)")
    return lines


def results_table(final: pd.DataFrame, metric_for: dict[str, str] | str, benchmarks: list[str] | None = None
                  ) -> pd.DataFrame:
    """``variant x (benchmarks + average)`` with columns ``mean``/``std``/``n`` per cell, in percent.

    ``metric_for``: one metric name for all benchmarks, or a per-benchmark mapping (avg@32 vs avg@1). A benchmark's
    cell uses every seed that has it; the average uses only the seeds that have every benchmark (a seed's average
    over fewer benchmarks is another quantity), matched by seed id; :func:`seed_gaps` names the seeds left out."""
    benchmarks = benchmarks or sorted(final.benchmark.unique())
    rows = []
    for variant in sorted(final.variant.unique()):
        row = {"variant": variant}
        frame = seed_frame(final, variant, metric_for, benchmarks)
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
    df = pd.DataFrame(rows).set_index("variant")
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


def _name(variant: str) -> str:
    algo = variant.split("[")[0]
    return LABELS.get(algo, algo) + variant[len(algo):]


def to_markdown(table: pd.DataFrame) -> str:
    cols = list(dict.fromkeys(table.columns.get_level_values(0)))
    bold = bold_mask(table)
    lines = ["| algorithm | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for variant in table.index:
        cells = [_cell(table.loc[variant, (c, "mean")], table.loc[variant, (c, "std")], bool(bold.loc[variant, c]),
                       False) for c in cols]
        lines.append(f"| {_name(variant)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    cols = list(dict.fromkeys(table.columns.get_level_values(0)))
    bold = bold_mask(table)
    head = " & ".join(["Algorithm"] + [c.replace("_", "\\_") for c in cols]) + " \\\\"
    body = []
    for variant in table.index:
        cells = [_cell(table.loc[variant, (c, "mean")], table.loc[variant, (c, "std")], bool(bold.loc[variant, c]),
                       True) for c in cols]
        body.append(" & ".join([_name(variant).replace("_", "\\_")] + cells) + " \\\\")
    return ("\\begin{tabular}{l" + "c" * len(cols) + "}\n\\toprule\n" + head + "\n\\midrule\n" + "\n".join(body)
            + "\n\\bottomrule\n\\end{tabular}\n")


def paper_comparison(table: pd.DataFrame) -> str | None:
    """Markdown table placing the paper's 7B numbers beside the reproduced ones; None unless the study evaluated
    the paper's benchmarks."""
    cols = set(table.columns.get_level_values(0))
    if not set(PAPER_BENCHMARKS) <= cols:
        return None
    lines = ["| algorithm | reproduced average | paper (7B) average | difference |", "|---|---|---|---|"]
    for variant in table.index:
        algo = variant.split("[")[0]
        if algo not in PAPER_7B_AVERAGE or variant != algo:
            continue
        mu, sd = table.loc[variant, ("average", "mean")], table.loc[variant, ("average", "std")]
        paper = PAPER_7B_AVERAGE[algo]
        lines.append(f"| {_name(variant)} | {mu:.1f} ± {sd:.1f} | {paper:.1f} | {mu - paper:+.1f} |")
    return "\n".join(lines) + "\n"
