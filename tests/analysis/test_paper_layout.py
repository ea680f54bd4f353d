"""The analysis on run folders shaped like a paper-preset study: six benchmarks with the paper's k map (avg@32 on
AIME24/AIME25/AMC23, avg@1 elsewhere), a base row, Table 1's layout and the side-by-side with the paper."""

import json
from pathlib import Path

import pytest
import yaml

from analysis.__main__ import main
from analysis.tables import PAPER_BENCHMARKS, paper_rows, paper_table_path

K = {"aime24": 32, "aime25": 32, "amc23": 32, "math500": 1, "minerva": 1, "olympiadbench": 1}
#: the paper's 7B row of each arm, so that the expected numbers are known: seeds at row - 1, row, row + 1 points
PAPER_7B = {
    "base": [13.3, 69.0, 5.5, 45.8, 34.7, 21.3],
    "nft": [32.0, 83.2, 18.3, 88.5, 47.3, 40.8],
    "grpo": [30.2, 80.4, 17.1, 79.5, 51.8, 38.2],
}
ORDER = ["aime24", "math500", "aime25", "amc23", "olympiadbench", "minerva"]

pytestmark = pytest.mark.skipif(not paper_table_path().is_file(), reason="../shared/paper/table1.csv not present")


def _eval(values: dict[str, float]) -> dict:
    """An evaluation JSON as `nft evaluate` writes it with the paper's k map (fractions; avg@k per benchmark)."""
    out = {}
    for b, v in values.items():
        k = K[b]
        out[b] = {f"avg@{k}": v / 100, f"pass@{k}": min(1.0, v / 50), "stderr": 0.02, "problems": 30}
    return out


def make_study(root: Path) -> tuple[Path, Path]:
    runs, evals = root / "runs", root / "evals"
    evals.mkdir(parents=True)
    for algo in ("nft", "grpo"):
        for seed, delta in enumerate((-1.0, 0.0, 1.0)):
            d = runs / f"{algo}-s{seed}"
            d.mkdir(parents=True)
            (d / "config.yaml").write_text(yaml.safe_dump({"resolved": {"algorithm": algo, "seed": seed}}))
            (d / "history.jsonl").write_text(json.dumps({"step": 0, "val/mean/avg@1": 0.1}) + "\n")
            (d / "metrics.json").write_text("{}")
            vals = dict(zip(ORDER, (v + delta for v in PAPER_7B[algo])))
            (evals / f"{algo}-s{seed}.json").write_text(json.dumps(_eval(vals)))
    (evals / "base.json").write_text(json.dumps(_eval(dict(zip(ORDER, PAPER_7B["base"])))))
    return runs, evals


def test_table_1_layout_with_a_metric_per_benchmark(tmp_path):
    runs, evals = make_study(tmp_path)
    out = tmp_path / "reports"
    assert main(["--runs", str(runs), "--evals", str(evals), "--out", str(out)]) == 0
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| arm | " + " | ".join(ORDER) + " | average |"
    assert table[2].startswith("| Base model | 13.3 ± 0.0 | 69.0 ± 0.0 |")  # the base row first, every column filled
    nft = next(line for line in table if line.startswith("| NFT |"))
    assert "–" not in nft and "**32.0 ± 1.0**" in nft  # AIME24 from avg@32, MATH500 from avg@1: none blank
    numbers = json.loads((out / "metrics.json").read_text())
    assert numbers["metric"] == "avg@k" and numbers["metric_per_benchmark"]["math500"] == "avg@1"
    assert numbers["metric_per_benchmark"]["aime24"] == "avg@32"
    assert numbers["arms"]["nft"]["mean"] == pytest.approx(sum(PAPER_7B["nft"]) / 6)  # six benchmarks averaged
    assert numbers["arms"]["nft"]["gain_over_base"] == pytest.approx((sum(PAPER_7B["nft"]) - sum(PAPER_7B["base"])) / 6)


def test_side_by_side_with_the_paper(tmp_path):
    runs, evals = make_study(tmp_path)
    out = tmp_path / "reports"
    assert main(["--runs", str(runs), "--evals", str(evals), "--out", str(out)]) == 0
    comp = (out / "paper_comparison.md").read_text().splitlines()
    row = next(line for line in comp if line.startswith("| NFT | aime24 |"))
    assert "| 32.0 [" in row and "| 3 | 32.0 | +0.0 | yes |" in row  # mean over seeds = the paper's value
    base = next(line for line in comp if line.startswith("| Base model | math500 |"))
    assert "| 1 | 69.0 | +0.0 | yes |" in base  # one evaluation: the interval is +-1.96 stderr (2 points)
    avg = next(line for line in comp if line.startswith("| GRPO | average |"))
    assert "| 49.5 | " in avg  # the paper's own average column
    assert (out / "figures" / "paper_bars.png").stat().st_size > 1000
    paper = paper_rows("Qwen2.5-32B")
    assert list(paper.columns) == PAPER_BENCHMARKS + ["average"] and paper.loc["nft", "average"] == 59.2
    with pytest.raises(ValueError, match="--paper-model"):
        paper_rows("Llama")


def test_paper_rows_without_an_arm_are_shown_not_reproduced(tmp_path):
    """Every row of the paper's Table 1 appears in the comparison: DPO, which no preset can produce, with its reason;
    a row this study did not run (DAPO, RFT, Dr.GRPO here) as not an arm of this study."""
    runs, evals = make_study(tmp_path)
    out = tmp_path / "reports"
    assert main(["--runs", str(runs), "--evals", str(evals), "--out", str(out)]) == 0
    comp = (out / "paper_comparison.md").read_text().splitlines()
    dpo = next(line for line in comp if line.startswith("| DPO |"))
    assert "not reproduced: the official repository (NVlabs/NFT) has no DPO script" in dpo and "| 48.9 |" in dpo
    for name in ("DAPO", "RFT", "Dr.GRPO"):
        row = next(line for line in comp if line.startswith(f"| {name} |"))
        assert "not reproduced: not an arm of this study" in row
    assert not any(line.startswith(("| NFT | average | not", "| GRPO | average | not")) for line in comp)
