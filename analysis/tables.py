"""Results tables (Markdown and LaTeX): benchmarks x algorithms, mean ± std over seeds, entries within 1 point of the
column maximum in bold (as the paper's Table 1), and the comparison with the paper's 7B numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .figures import LABELS
from .load import seed_matrix
from .stats import mean_std

#: Table 1 of the paper (Qwen2.5-Math-7B), average over the six benchmarks, in percent (as quoted in the issue
#: tracker). Per-benchmark entries are left out rather than guessed: add them from the paper's Table 1 to compare
#: benchmark by benchmark.
PAPER_7B_AVERAGE = {"nft": 51.7, "dapo": 51.2, "grpo": 49.5, "dr_grpo": 49.8, "rft": 48.3}
PAPER_BENCHMARKS = ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]


def results_table(final: pd.DataFrame, metric_for: dict[str, str] | str, benchmarks: list[str] | None = None
                  ) -> pd.DataFrame:
    """``variant x (benchmarks + average)`` with columns ``mean``/``std``/``n`` per cell, in percent.

    ``metric_for``: one metric name for all benchmarks, or a per-benchmark mapping (avg@32 vs avg@1)."""
    benchmarks = benchmarks or sorted(final.benchmark.unique())
    rows = []
    for variant in sorted(final.variant.unique()):
        row = {"variant": variant}
        per_seed_avg = []
        mats = []
        for b in benchmarks:
            m = metric_for if isinstance(metric_for, str) else metric_for.get(b, "")
            mat = seed_matrix(final, variant, m, [b]) * 100
            mats.append(mat)
            mu, sd = mean_std(mat)
            row[(b, "mean")], row[(b, "std")], row[(b, "n")] = mu, sd, int(np.sum(~np.isnan(mat)))
        if mats:
            seeds = max(len(m) for m in mats)
            full = np.full((seeds, len(mats)), np.nan)
            for j, m in enumerate(mats):
                full[: len(m), j] = m[:, 0] if m.size else np.nan
            per_seed_avg = full
            mu, sd = mean_std(per_seed_avg)
            row[("average", "mean")], row[("average", "std")] = mu, sd
            row[("average", "n")] = int(np.sum(~np.isnan(per_seed_avg).any(axis=1)))
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
