"""The study's numbers, then its reports: :func:`compute` derives every number once (tables, intervals, gains,
probabilities of improvement, claims) from the tidy frames; :func:`render` writes figures, tables and
``summary.md`` from them, computing nothing (as rliable separates its aggregates from its plots)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .claims import claims_markdown, diff_interval, evaluate_claims
from .figures import save, standard_figures
from .load import BASE
from .stats import iqm, mean_std, poi_ci, stratified_bootstrap_ci
from .tables import paper_bars, paper_comparison, results_table, seed_frame, seed_gaps, to_latex, to_markdown


def headline_metric(final, k: int | None) -> str:
    """avg@k of the final evaluation (the largest k present when not given)."""
    metrics = [m for m in final.metric.unique() if m.startswith("avg@")]
    if k is not None:
        return f"avg@{k}"
    return max(metrics, key=lambda m: int(m.split("@")[1])) if metrics else "avg@1"


def headline_metrics(final, benchmarks: list[str], k: int | None) -> dict[str, str]:
    """The headline metric of each benchmark: ``avg@k`` when given, else the avg@k with the largest k that benchmark
    was evaluated with (the paper presets: avg@32 on AIME24/AIME25/AMC23, avg@1 on the others)."""
    out = {}
    for b in benchmarks:
        sub = final[final.benchmark == b] if len(final) else final
        out[b] = headline_metric(sub, k) if len(sub) else f"avg@{k or 1}"
    return out


def metric_label(metric_for: dict[str, str]) -> str:
    """``avg@4`` when every benchmark uses it, else ``avg@k`` (k per benchmark)."""
    kinds = set(metric_for.values())
    return kinds.pop() if len(kinds) == 1 else "avg@k"


#: Table 1's column order (the paper's), then the synthetic sets
ORDER = {
    "aime24": 0,
    "math500": 1,
    "aime25": 2,
    "amc23": 3,
    "olympiadbench": 4,
    "minerva": 5,
    "synth-easy": 6,
    "synth-medium": 7,
    "synth-hard": 8,
}


@dataclass
class Results:
    """Everything the reports show, computed once."""

    benchmarks: list[str]
    metric_for: dict[str, str]  # each benchmark's headline metric
    plot_k: int  # the k of the validation curves
    arms: list[str]  # the arms, the base model's row first
    numbers: dict  # metric, per-arm statistics, gains, probabilities of improvement, claims (metrics.json)
    problems: list[str]
    table: object = None  # the results table (a DataFrame), None without a final evaluation
    comparison: str | None = None  # the paper comparison (markdown), when the study evaluated the paper's sets
    claims: list[dict] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.numbers["metric"]


def compute(history, final, problems: list[str], k: int | None = None, seed: int = 0, paper_model: str = "") -> Results:
    """The study's numbers from the tidy frames (:mod:`analysis.load`)."""
    benchmarks = sorted(final.benchmark.unique(), key=lambda b: (ORDER.get(b, 99), b))
    arms_final = final[final.arm != BASE] if (final.arm != BASE).any() else final
    metric_for = headline_metrics(arms_final, benchmarks, k)  # the arms' k (a base row evaluated otherwise is blank)
    kval = max([int(m.split("@")[1]) for m in metric_for.values()] or [1])
    val_k = sorted({int(m.split("@")[1]) for m in history.metric.unique() if m.startswith("val/mean/avg@")})
    arms = sorted(final.arm.unique(), key=lambda v: (v != BASE, v))
    numbers: dict = {"metric": metric_label(metric_for), "metric_per_benchmark": metric_for, "arms": {}}
    res = Results(benchmarks, metric_for, val_k[-1] if val_k else kval, arms, numbers, list(problems))
    if len(final):  # seeds without every benchmark are left out of the average: say which
        res.problems += seed_gaps(final, metric_for, benchmarks)
        res.table = results_table(final, metric_for, benchmarks)
    if res.table is not None and len(res.table):
        res.comparison = paper_comparison(final, metric_for, benchmarks, paper_model, seed=seed) or None
        mats = {v: seed_frame(final, v, metric_for, benchmarks).to_numpy(dtype=float) for v in arms}
        _arm_statistics(mats, numbers, seed)
        if BASE in mats and mats[BASE].size:
            numbers["gain_computed"] = _gains(mats, numbers, seed)
        res.claims = evaluate_claims(history, final, metric_for, benchmarks, seed=seed)
        numbers["claims"] = {c["id"]: c for c in res.claims}
    nan_rows = int(history.value.isna().sum()) if len(history) else 0
    if nan_rows:
        res.problems.append(f"{nan_rows} NaN metric values were ignored")
    return res


def _arm_statistics(mats: dict, numbers: dict, seed: int) -> None:
    """Each arm's mean, std, bootstrap interval and IQM over seeds x benchmarks, and the probability that each arm
    beats each other (into ``numbers``)."""
    for v, mat in mats.items():
        point, lo, hi = stratified_bootstrap_ci(mat, seed=seed) if mat.size else (np.nan,) * 3
        mu, sd = mean_std(mat)
        numbers["arms"][v] = {
            "mean": mu,
            "std": sd,
            "point": point,
            "ci_low": lo,
            "ci_high": hi,
            "iqm": iqm(mat),
            "seeds": int(mat.shape[0]),
        }
    arms = [v for v in mats if v != BASE]
    for a in arms:
        for b in arms:
            if a != b:
                numbers.setdefault("poi", {})[f"{a}>{b}"] = poi_ci(mats[a], mats[b], seed=seed)


def _gains(mats: dict, numbers: dict, seed: int) -> bool:
    """Each arm's gain over the base model (average over benchmarks, points): mean over seeds, std over seeds, 95%
    bootstrap interval (the arm's seeds resampled; the base is one evaluation). False: the base model lacks the
    arms' headline metrics."""
    base = np.nanmean(mats[BASE], axis=1) if not np.isnan(mats[BASE]).all() else np.array([])
    base = base[~np.isnan(base)]
    if not base.size:
        return False
    numbers["base_mean"] = float(base.mean())
    for v, mat in mats.items():
        if v == BASE or not mat.size:
            continue
        per = np.nanmean(mat, axis=1)
        per = per[~np.isnan(per)]
        if not per.size:
            continue
        d, lo, hi = diff_interval(per, base, seed=seed)
        numbers["arms"][v].update(
            {
                "gain_over_base": d,
                "gain_ci_low": lo,
                "gain_ci_high": hi,
                "gain_std": float(per.std(ddof=1)) if per.size > 1 else 0.0,
                "gain_seeds": int(per.size),
            }
        )
    return True


def render(res: Results, history, final, out: Path, source: str, per_seed: bool = False, paper_model: str = "") -> None:
    """Write the figures, tables, plots' CSVs, tidy frames and ``summary.md`` of ``res`` into ``out`` (atomically:
    the folder is built aside and put in place whole)."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    figs = standard_figures(history, res.plot_k, per_seed=per_seed)
    fig_files = {name: save(fig, tmp / "figures", name) for name, fig in figs.items()}
    metric = res.metric
    per = "" if metric != "avg@k" else " (" + ", ".join(f"{b} {m}" for b, m in res.metric_for.items()) + ")"
    lines = [
        "# Study summary\n",
        f"Source: {source}. Headline metric: **{metric}**{per} of the final evaluation, in "
        f"percent, mean ± std over seeds (entries within 1 point of the best in bold).\n",
    ]
    lines += _runs_section(history)
    if res.table is not None and len(res.table):
        (tmp / "results.md").write_text(to_markdown(res.table))
        (tmp / "results.tex").write_text(to_latex(res.table))
        lines += ["## Results\n", to_markdown(res.table)]
        if res.comparison:
            (tmp / "paper_comparison.md").write_text(res.comparison)
            lines += [f"## Against the paper ({paper_model}, Table 1)\n", res.comparison]
            fig = paper_bars(res.table, paper_model)
            if fig is not None:
                fig_files["paper_bars"] = save(fig, tmp / "figures", "paper_bars")
        lines += _statistics_lines(res)
        (tmp / "claims.md").write_text(claims_markdown(res.claims, metric))
        lines += [
            "## The paper's claims (claims.md)\n",
            "\n".join(f"- {c['claim']}: **{c['verdict']}**" for c in res.claims),
            "",
        ]
    else:
        lines.append("No final evaluation found.\n")
    lines += ["## Figures\n"] + [
        f"- `{name}`: " + ", ".join(f"figures/{p.name}" for p in files) for name, files in fig_files.items()
    ]
    lines += ["", "## Problems\n"] + ([f"- {p}" for p in res.problems] if res.problems else ["- none"])
    (tmp / "summary.md").write_text("\n".join(lines) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(public_numbers(res.numbers), indent=2, default=float))
    write_plot_tables(history, tmp / "plots", res.plot_k)
    history.to_csv(tmp / "history_tidy.csv", index=False)
    final.to_csv(tmp / "final_tidy.csv", index=False)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def public_numbers(numbers: dict) -> dict:
    """``numbers`` as reports/metrics.json holds them: the render-only fields left out."""
    out = {k: v for k, v in numbers.items() if k not in ("gain_computed", "base_mean")}
    out["arms"] = {
        v: {k: x for k, x in m.items() if k not in ("point", "gain_std", "gain_seeds")}
        for v, m in numbers["arms"].items()
    }
    if "poi" in numbers:
        out["poi"] = {k: p[0] for k, p in numbers["poi"].items()}
    return out


def _runs_section(history) -> list[str]:
    """The summary's table of runs: each arm's seeds and the last step each reached."""
    runs = history.groupby(["arm", "seed"]).step.max().reset_index() if len(history) else None
    if runs is None or not len(runs):
        return []
    lines = ["## Runs\n\n| arm | seeds | last step |\n|---|---|---|"]
    for v, g in runs.groupby("arm"):
        lines.append(
            f"| {v} | {', '.join(map(str, sorted(g.seed)))} | "
            f"{', '.join(str(int(s)) for s in g.sort_values('seed').step)} |"
        )
    return [*lines, ""]


def _statistics_lines(res: Results) -> list[str]:
    numbers = res.numbers
    lines = [
        "## Statistics over seeds x benchmarks\n",
        "Stratified bootstrap 95% intervals (2,000 resamples, seeded), interquartile mean, and probability "
        "of improvement P(row > column).\n",
        "| arm | mean | 95% CI | IQM | seeds |",
        "|---|---|---|---|---|",
    ]
    for v in res.arms:
        m = numbers["arms"][v]
        lines.append(
            f"| {v} | {m['point']:.1f} | [{m['ci_low']:.1f}, {m['ci_high']:.1f}] | {m['iqm']:.1f} | {m['seeds']} |"
        )
    lines.append("")
    if "gain_computed" in numbers:
        lines += _gain_lines(res)
    arms = [v for v in res.arms if v != BASE]
    if len(arms) > 1:
        lines += ["| P(row > column) | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for a in arms:
            cells = []
            for b in arms:
                if a == b:
                    cells.append("–")
                    continue
                p, lo, hi = numbers["poi"][f"{a}>{b}"]
                cells.append(f"{p:.2f} [{lo:.2f}, {hi:.2f}]")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _gain_lines(res: Results) -> list[str]:
    numbers = res.numbers
    if not numbers["gain_computed"]:
        return [
            "### Gain over the base model\n",
            "Not computed: the base model's evaluation lacks the arms' headline "
            "metrics (evaluate it with the same `eval` settings).\n",
        ]
    lines = [
        "### Gain over the base model\n",
        f"Base model: {numbers['base_mean']:.1f} (one evaluation). Gain = arm − base, average over benchmarks, in "
        "points.\n",
        "| arm | gain | std over seeds | 95% CI | seeds |",
        "|---|---|---|---|---|",
    ]
    for v, m in numbers["arms"].items():
        if "gain_over_base" in m:
            d, lo, hi = m["gain_over_base"], m["gain_ci_low"], m["gain_ci_high"]
            lines.append(f"| {v} | {d:+.1f} | {m['gain_std']:.1f} | [{lo:+.1f}, {hi:+.1f}] | {m['gain_seeds']} |")
    return lines + [""]


def write_plot_tables(history, out: Path, k: int) -> None:
    """Wide CSVs (step x arm, mean over seeds) for ``dvc plots``: val_accuracy, entropy, reward."""
    from .load import curve

    out.mkdir(parents=True, exist_ok=True)
    for name, metric in [
        ("val_accuracy", f"val/mean/avg@{k}"),
        ("entropy", "policy/entropy"),
        ("reward", "rollout/accuracy"),
    ]:
        c = curve(history, metric)
        wide = c.pivot(index="step", columns="arm", values="mean") if len(c) else None
        if wide is not None:
            wide.reset_index().to_csv(out / f"{name}.csv", index=False)


def study_metrics(numbers: dict) -> dict:
    """The summary as ``dvc exp show`` tabulates it: ``{metric: {arm: {mean, std, ci_low, ci_high, seeds,
    gain_over_base}}}`` (percent; numbers only; the base model is an arm, ``base``)."""
    keys = ("mean", "std", "ci_low", "ci_high", "seeds", "gain_over_base")
    return {
        numbers["metric"]: {
            v: {
                k: float(m[k]) if k != "seeds" else int(m[k]) for k in keys if k in m and np.isfinite(m[k])
            }  # strict JSON: no NaN
            for v, m in numbers["arms"].items()
        }
    }
