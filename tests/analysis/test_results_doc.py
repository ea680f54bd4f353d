"""docs/results.md is what `python -m analysis.results_doc` writes from the recorded studies."""

from analysis.results_doc import main, render
from tests.conftest import REPO


def test_the_committed_results_are_generated_from_the_references(tmp_path):
    assert main(["--out", str(tmp_path / "results.md")]) == 0
    assert (tmp_path / "results.md").read_text() == (REPO / "docs" / "results.md").read_text(), (
        "docs/results.md is stale: python -m analysis.results_doc --out docs/results.md"
    )


def test_every_reference_has_its_arms_and_claims():
    text = render()
    assert text.count("\n## ") == len(list((REPO / "experiments" / "reference").glob("*.json")))
    assert "| nft | " in text and "NFT above RFT" in text
