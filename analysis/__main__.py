"""The ``analyze`` stage: finished runs -> figures, tables and ``reports/summary.md``.

python -m analysis --runs runs --evals evals --out reports
python -m analysis --mlflow-experiment embedded-default --out reports     # the same from MLflow
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .load import load_mlflow, load_runs
from .summary import compute, public_numbers, render, study_metrics


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
    """Compute the study's numbers, then write its figures, tables and summary into ``out``; returns the numbers (for
    tests and DVC metrics)."""
    res = compute(history, final, problems, k, seed, paper_model)
    render(res, history, final, out, source, per_seed, paper_model)
    return public_numbers(res.numbers)


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
    print(f"analysis: {len(numbers['arms'])} arms -> {args.out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
