"""The ``analyze`` stage: finished runs -> figures, tables and ``reports/summary.md``.

python -m analysis --runs runs --evals evals --out reports
python -m analysis --mlflow-experiment embedded-default --out reports     # the same from MLflow
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from .claims import claims_markdown, diff_interval, evaluate_claims
from .figures import save, standard_figures
from .load import BASE, load_mlflow, load_runs
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


def analyze(
    history,
    final,
    problems: list[str],
    out: Path,
    source: str,
    k: int | None = None,
    seed: int = 0,
    per_seed: bool = False,
    paper_model: str = "Qwen2.5-Math-7B",
) -> dict:
    """Write figures, tables and the summary into ``out``; returns the numbers (for tests and DVC metrics)."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "figures").mkdir(parents=True)
    benchmarks = sorted(final.benchmark.unique(), key=lambda b: (ORDER.get(b, 99), b))
    arms_final = final[final.variant != BASE] if (final.variant != BASE).any() else final
    metric_for = headline_metrics(arms_final, benchmarks, k)  # the arms' k (a base row evaluated otherwise is blank)
    metric = metric_label(metric_for)
    kval = max([int(m.split("@")[1]) for m in metric_for.values()] or [1])
    val_k = sorted({int(m.split("@")[1]) for m in history.metric.unique() if m.startswith("val/mean/avg@")})
    figs = standard_figures(history, val_k[-1] if val_k else kval, per_seed=per_seed)
    fig_files = {name: save(fig, tmp / "figures", name) for name, fig in figs.items()}
    variants = sorted(final.variant.unique(), key=lambda v: (v != BASE, v))  # the base model's row first
    table = results_table(final, metric_for, benchmarks) if len(final) else None
    if len(final):  # seeds without every benchmark are left out of the average: say which
        problems = problems + seed_gaps(final, metric_for, benchmarks)
    numbers: dict = {"metric": metric, "metric_per_benchmark": metric_for, "variants": {}}
    per = "" if metric != "avg@k" else " (" + ", ".join(f"{b} {m}" for b, m in metric_for.items()) + ")"
    lines = [
        "# Study summary\n",
        f"Source: {source}. Headline metric: **{metric}**{per} of the final evaluation, in "
        f"percent, mean ± std over seeds (entries within 1 point of the best in bold).\n",
    ]
    lines += _runs_section(history)
    if table is not None and len(table):
        (tmp / "results.md").write_text(to_markdown(table))
        (tmp / "results.tex").write_text(to_latex(table))
        lines += ["## Results\n", to_markdown(table)]
        comp = paper_comparison(final, metric_for, benchmarks, paper_model, seed=seed)
        if comp:
            (tmp / "paper_comparison.md").write_text(comp)
            lines += [f"## Against the paper ({paper_model}, Table 1)\n", comp]
            fig = paper_bars(table, paper_model)
            if fig is not None:
                fig_files["paper_bars"] = save(fig, tmp / "figures", "paper_bars")
        lines += _statistics(final, variants, metric_for, benchmarks, numbers, seed)
        claims = evaluate_claims(history, final, metric_for, benchmarks, seed=seed)
        numbers["claims"] = {c["id"]: c for c in claims}
        (tmp / "claims.md").write_text(claims_markdown(claims, metric))
        lines += [
            "## The paper's claims (claims.md)\n",
            "\n".join(f"- {c['claim']}: **{c['verdict']}**" for c in claims),
            "",
        ]
    else:
        lines.append("No final evaluation found.\n")
    nan_rows = int(history.value.isna().sum()) if len(history) else 0
    if nan_rows:
        problems = problems + [f"{nan_rows} NaN metric values were ignored"]
    lines += ["## Figures\n"] + [
        f"- `{name}`: " + ", ".join(f"figures/{p.name}" for p in files) for name, files in fig_files.items()
    ]
    lines += ["", "## Problems\n"] + ([f"- {p}" for p in problems] if problems else ["- none"])
    (tmp / "summary.md").write_text("\n".join(lines) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(numbers, indent=2, default=float))
    write_plot_tables(history, tmp / "plots", val_k[-1] if val_k else kval)
    history.to_csv(tmp / "history_tidy.csv", index=False)
    final.to_csv(tmp / "final_tidy.csv", index=False)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return numbers


def _runs_section(history) -> list[str]:
    """The summary's table of runs: each arm's seeds and the last step each reached."""
    runs = history.groupby(["variant", "seed"]).step.max().reset_index() if len(history) else None
    if runs is None or not len(runs):
        return []
    lines = ["## Runs\n\n| variant | seeds | last step |\n|---|---|---|"]
    for v, g in runs.groupby("variant"):
        lines.append(
            f"| {v} | {', '.join(map(str, sorted(g.seed)))} | "
            f"{', '.join(str(int(s)) for s in g.sort_values('seed').step)} |"
        )
    return [*lines, ""]


def _statistics(final, variants: list[str], metric_for, benchmarks: list[str], numbers: dict, seed: int) -> list[str]:
    """Each arm's interval, IQM, gain over the base model and probability of improvement over the others (into
    ``numbers``), as the summary's lines."""
    lines = [
        "## Statistics over seeds x benchmarks\n",
        "Stratified bootstrap 95% intervals (2,000 resamples, seeded), interquartile mean, and probability "
        "of improvement P(row > column).\n",
        "| variant | mean | 95% CI | IQM | seeds |",
        "|---|---|---|---|---|",
    ]
    mats = {v: seed_frame(final, v, metric_for, benchmarks).to_numpy(dtype=float) for v in variants}
    for v in variants:
        mat = mats[v]
        point, lo, hi = stratified_bootstrap_ci(mat, seed=seed) if mat.size else (np.nan,) * 3
        mu, sd = mean_std(mat)
        numbers["variants"][v] = {
            "mean": mu,
            "std": sd,
            "ci_low": lo,
            "ci_high": hi,
            "iqm": iqm(mat),
            "seeds": int(mat.shape[0]),
        }
        lines.append(f"| {v} | {point:.1f} | [{lo:.1f}, {hi:.1f}] | {iqm(mat):.1f} | {mat.shape[0]} |")
    lines.append("")
    if BASE in mats and mats[BASE].size:
        lines += _gains(mats, numbers, seed)
    arms = [v for v in variants if v != BASE]
    if len(arms) > 1:
        lines += ["| P(row > column) | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for a in arms:
            cells = []
            for b in arms:
                if a == b:
                    cells.append("–")
                    continue
                p, lo, hi = poi_ci(mats[a], mats[b], seed=seed)
                numbers.setdefault("poi", {})[f"{a}>{b}"] = p
                cells.append(f"{p:.2f} [{lo:.2f}, {hi:.2f}]")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _gains(mats: dict, numbers: dict, seed: int) -> list[str]:
    """Each arm's gain over the base model (average over benchmarks, points): mean over seeds, std over seeds, 95%
    bootstrap interval (the arm's seeds resampled; the base is one evaluation); into ``numbers`` and summary lines."""
    base = np.nanmean(mats[BASE], axis=1) if not np.isnan(mats[BASE]).all() else np.array([])
    base = base[~np.isnan(base)]
    if not base.size:  # the base model was evaluated with other metrics than the arms: no gain to compute
        return [
            "### Gain over the base model\n",
            "Not computed: the base model's evaluation lacks the arms' headline "
            "metrics (evaluate it with the same `eval` settings).\n",
        ]
    lines = [
        "### Gain over the base model\n",
        f"Base model: {base.mean():.1f} (one evaluation). Gain = arm − base, average over benchmarks, in points.\n",
        "| variant | gain | std over seeds | 95% CI | seeds |",
        "|---|---|---|---|---|",
    ]
    for v, mat in mats.items():
        if v == BASE or not mat.size:
            continue
        per = np.nanmean(mat, axis=1)
        per = per[~np.isnan(per)]
        if not per.size:
            continue
        d, lo, hi = diff_interval(per, base, seed=seed)
        sd = float(per.std(ddof=1)) if per.size > 1 else 0.0
        numbers["variants"][v].update({"gain_over_base": d, "gain_ci_low": lo, "gain_ci_high": hi})
        lines.append(f"| {v} | {d:+.1f} | {sd:.1f} | [{lo:+.1f}, {hi:+.1f}] | {per.size} |")
    return lines + [""]


def write_plot_tables(history, out: Path, k: int) -> None:
    """Wide CSVs (step x algorithm, mean over seeds) for ``dvc plots``: val_accuracy, entropy, reward."""
    from .load import curve

    out.mkdir(parents=True, exist_ok=True)
    for name, metric in [
        ("val_accuracy", f"val/mean/avg@{k}"),
        ("entropy", "policy/entropy"),
        ("reward", "rollout/accuracy"),
    ]:
        c = curve(history, metric)
        wide = c.pivot(index="step", columns="variant", values="mean") if len(c) else None
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
            for v, m in numbers["variants"].items()
        }
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs", help="folder of run folders")
    ap.add_argument("--evals", default="evals", help="folder of final evaluation JSONs (<run>.json)")
    ap.add_argument("--mlflow-experiment", default=None, help="read the runs from this MLflow experiment instead")
    ap.add_argument("--tracking-uri", default="", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    ap.add_argument(
        "--dvc-exp",
        default=None,
        help="with --mlflow-experiment: the runs of this DVC experiment only (workspace: the plain dvc repro)",
    )
    ap.add_argument("--out", default="reports")
    ap.add_argument("--k", type=int, default=None, help="headline avg@k (default: the largest in the evaluation)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--per-seed", action="store_true", help="figures: each seed's curve as a thin line too")
    ap.add_argument(
        "--paper-model",
        default="Qwen2.5-Math-7B",
        help="the paper's Table 1 rows to compare with (Qwen2.5-Math-7B or Qwen2.5-32B), when the study "
        "evaluated the paper's benchmarks",
    )
    ap.add_argument(
        "--log-mlflow",
        action="store_true",
        help="log the reports and the summary into the study's MLflow run (the train runs' parent)",
    )
    ap.add_argument(
        "--metrics",
        default=None,
        help="also write the study summary as a DVC metrics file (per arm: mean, std, 95%% CI, seeds)",
    )
    args = ap.parse_args(argv)
    evals = Path(args.evals) if Path(args.evals).is_dir() else None
    if args.mlflow_experiment:
        history, final, problems = load_mlflow(args.mlflow_experiment, args.tracking_uri, evals, args.dvc_exp)
        source = f"MLflow experiment {args.mlflow_experiment}"
    else:
        if not Path(args.runs).is_dir():
            print(f"analysis: error: {args.runs}: runs folder not found", file=sys.stderr)
            return 2
        history, final, problems = load_runs(args.runs, evals)
        source = f"run folders under {args.runs}"
    numbers = analyze(
        history, final, problems, Path(args.out), source, args.k, args.seed, args.per_seed, args.paper_model
    )
    if args.metrics:
        from nft.io import atomic_write_json

        atomic_write_json(args.metrics, study_metrics(numbers))
    if args.log_mlflow and not args.mlflow_experiment:
        from nft.flat import flatten
        from nft.tracking_replay import log_study

        ids = log_study(args.runs, args.out, flatten(study_metrics(numbers), ""))
        print(f"analysis: logged into MLflow study run(s) {ids}")
    print(f"analysis: {len(numbers['variants'])} variants -> {args.out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
