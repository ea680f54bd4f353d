"""The analysis on generated run folders with known answers, and the same numbers through MLflow."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.__main__ import analyze, main
from analysis.figures import standard_figures
from analysis.load import curve, load_mlflow, load_runs
from analysis.tables import bold_mask, results_table, to_latex, to_markdown

# final synth-medium / synth-easy accuracy per (arm, seed); nft is best on medium, grpo within 1 point on easy
FINAL = {
    ("nft", 0): (0.30, 0.50),
    ("nft", 1): (0.32, 0.52),
    ("nft", 2): (0.34, 0.54),
    ("grpo", 0): (0.20, 0.515),
    ("grpo", 1): (0.22, 0.525),  # seed 2 missing
}


def make_runs(root: Path) -> Path:
    runs = root / "runs"
    for (algo, seed), (med, easy) in FINAL.items():
        d = runs / f"{algo}-s{seed}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(
            yaml.safe_dump({"resolved": {"algorithm": algo, "seed": seed, "train": {"loss": {}}}})
        )
        steps = 4 if (algo, seed) != ("nft", 2) else 2  # unequal length
        rows = [{"step": 0, "val/synth-medium/avg@4": 0.1, "val/synth-easy/avg@4": 0.3, "val/mean/avg@4": 0.2}]
        for s in range(1, steps + 1):
            row = {
                "step": s,
                "policy/entropy": 0.5 + 0.1 * seed + s * (0.1 if algo == "nft" else -0.1),
                "rollout/accuracy": 0.1 * s,
                "response/length_mean": 20.0,
                "train/optimizer_steps": 4,
            }
            if s == 1 and algo == "grpo":
                row["policy/entropy"] = float("nan")
            if s == steps:
                row.update(
                    {"val/synth-medium/avg@4": med, "val/synth-easy/avg@4": easy, "val/mean/avg@4": (med + easy) / 2}
                )
            rows.append(row)
        (d / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "tags.json").write_text(json.dumps({"algorithm": algo, "seed": str(seed), "study": "gen"}))
        if (algo, seed) != ("grpo", 1):
            (d / "metrics.json").write_text("{}")
    (runs / "stray").mkdir()
    return runs


def test_tidy_frames_and_exact_statistics(tmp_path):
    runs = make_runs(tmp_path)
    history, final, problems = load_runs(runs)
    assert set(history.columns) == {"run", "algorithm", "arm", "seed", "step", "metric", "value"}
    assert any("stray" in p for p in problems) and any("grpo-s1: unfinished" in p for p in problems)
    table = results_table(final, "avg@4", ["synth-easy", "synth-medium"])
    assert table.loc["nft", ("synth-medium", "mean")] == pytest.approx(32.0)
    assert table.loc["nft", ("synth-medium", "std")] == pytest.approx(2.0)
    assert table.loc["grpo", ("synth-medium", "mean")] == pytest.approx(21.0)
    assert table.loc["grpo", ("synth-medium", "n")] == 2
    bold = bold_mask(table)
    assert bold.loc["nft", "synth-medium"] and not bold.loc["grpo", "synth-medium"]
    assert bold.loc["nft", "synth-easy"] and bold.loc["grpo", "synth-easy"]  # 52.0 vs 52.0: within 1 point
    md, tex = to_markdown(table), to_latex(table)
    assert "**32.0 ± 2.0**" in md and "\\textbf{32.0 $\\pm$ 2.0}" in tex and "21.0 ± 1.4" in md
    c = curve(history, "policy/entropy")
    grpo1 = c[(c.arm == "grpo") & (c.step == 1)]
    assert grpo1.empty  # both grpo seeds have NaN at step 1: dropped, not averaged as 0
    nft4 = c[(c.arm == "nft") & (c.step == 4)]
    assert nft4["n"].item() == 2  # seed 2 stopped at step 2


def test_report_files_and_figures(tmp_path):
    runs = make_runs(tmp_path)
    assert main(["--runs", str(runs), "--out", str(tmp_path / "reports")]) == 0
    out = tmp_path / "reports"
    summary = (out / "summary.md").read_text()
    assert "nft" in summary and "Problems" in summary and "unfinished" in summary and "NaN" in summary
    numbers = json.loads((out / "metrics.json").read_text())
    assert numbers["arms"]["nft"]["seeds"] == 3 and numbers["arms"]["grpo"]["seeds"] == 2
    assert numbers["poi"]["nft>grpo"] == pytest.approx(0.75)  # medium: 6/6; easy: 3/6 -> mean over benchmarks
    for name in ("val_accuracy", "entropy", "reward", "length", "val_accuracy_synth-medium"):
        for ext in ("png", "pdf"):
            f = out / "figures" / f"{name}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000
    history, _, _ = load_runs(runs)
    figs = standard_figures(history, 4)
    ax = figs["entropy"].axes[0]
    assert ax.get_xlabel() == "rollout step (4 optimizer steps each)" and "entropy" in ax.get_ylabel()
    assert ax.get_legend() is None  # the legend sits beside the axes, off the data
    assert {t.get_text() for t in figs["entropy"].legends[0].get_texts()} == {"NFT", "GRPO"}
    thin = standard_figures(history, 4, per_seed=True)["entropy"].axes[0]
    assert len(thin.lines) == len(ax.lines) + 5  # one thin line per run (3 nft + 2 grpo seeds)
    colors = {line.get_label(): line.get_color() for line in figs["val_accuracy"].axes[0].lines}
    assert colors == {line.get_label(): line.get_color() for line in ax.lines}  # one colour per algorithm
    assert (out / "plots" / "val_accuracy.csv").read_text().startswith("step,grpo,nft")


def test_same_numbers_from_mlflow(tmp_path):
    from nft.tracking_replay import replay

    runs = make_runs(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for d in sorted(runs.iterdir()):
        if (d / "config.yaml").is_file():
            replay(d, uri, "gen")
    h1, f1, _ = load_runs(runs)
    h2, f2, _ = load_mlflow("gen", uri)
    key = ["run", "metric", "step"]
    a = h1.dropna().sort_values(key).reset_index(drop=True)
    b = h2.dropna().sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[key + ["value"]], b[key + ["value"]])
    n1 = analyze(h1, f1, [], tmp_path / "r1", "folders")
    n2 = analyze(h2, f2, [], tmp_path / "r2", "mlflow")
    assert n1["arms"] == n2["arms"] and n1["poi"] == n2["poi"]
