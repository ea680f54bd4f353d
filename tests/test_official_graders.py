"""The registered ``math_verify_official`` grader against a transcription of the official NFT code's call
(NVlabs/NFT ``verifier.py:33-51``, ``math_verify_compute_score``; verl's ``math_verify.compute_score`` is the same
call), on probes where the project's own ``math_verify`` and the official call differ, and on every benchmark's
golds (../shared/benchmarks)."""

from __future__ import annotations

import pytest

from nft.data.hub import load_local
from nft.reward import grade, grade_math_verify_official
from tests.conftest import SHARED_BENCHMARKS


def official_math_verify(model_output: str, ground_truth: str) -> float:
    """Transcribed from NVlabs/NFT verifier.py:33-51 (the ``acc`` it returns)."""
    from math_verify.metric import math_metric
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    verify_func = math_metric(
        gold_extraction_target=(LatexExtractionConfig(),),
        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
    )
    ret_score = 0.0
    ground_truth_boxed = "\\boxed{" + ground_truth + "}"
    try:
        ret_score, _ = verify_func([ground_truth_boxed], [model_output])
    except Exception as e:  # noqa: BLE001 - as the official code
        print(e)
    return 1.0 if ret_score > 0.5 else 0.0


#: (response, gold, the project's math_verify, the official call)
PROBES = [
    ("Thus the final answer is $5$.", "5", False, True),
    ("The answer is 5", "5", False, True),
    ("\\boxed{5 \\text{ cm}}", "5", False, True),
    ("\\boxed{7.5 \\, \\text{m/s}}", "7.5", False, True),
    ("\\boxed{30^\\circ}", "30", False, True),
    ("\\boxed{\\text{5}}", "5", False, True),
    ("So $x = \\boxed{5}$.", "5", True, True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True, True),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", True, True),
    ("\\boxed{6}", "5", False, False),
    ("First \\boxed{5}, then \\boxed{6}.", "6", True, False),  # two boxes: the official extraction gives up
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True, True),
    ("\\boxed{(1, 2)}", "(1,2)", True, True),
    ("no answer here", "5", False, False),
    ("\\boxed{x^2 + 1}", "1 + x^2", True, True),
    ("\\boxed{-3}", "3", False, False),
]


@pytest.mark.parametrize("response,gold,ours,official", PROBES)
def test_probes(response, gold, ours, official):
    assert official_math_verify(response, gold) == float(official)
    assert grade_math_verify_official(response, gold) is official
    assert grade(response, gold, "math_verify_official") is official  # the registry entry
    assert grade(response, gold, "math_verify") is ours


@pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason=f"{SHARED_BENCHMARKS} absent")
@pytest.mark.parametrize("name", ["math500", "minerva", "olympiadbench", "aime24", "aime25", "amc23"])
def test_every_gold_is_graded_as_the_official_call_grades_it(name):
    """Each gold, boxed at the end of a sentence, and the next problem's gold in its place: the two verdicts of the
    registered grader equal the official call's."""
    golds = [p.answer for p in load_local(name, SHARED_BENCHMARKS)]
    differ = []
    for i, g in enumerate(golds):
        for text in (f"So the answer is $\\boxed{{{g}}}$.", f"So the answer is $\\boxed{{{golds[i - 1]}}}$."):
            if grade_math_verify_official(text, g) != bool(official_math_verify(text, g)):
                differ.append((text, g))
    assert not differ, differ[:5]
