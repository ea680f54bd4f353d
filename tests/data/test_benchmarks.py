"""The benchmark registry on the real files of ../shared/benchmarks (present in CI) and on a hub-shaped fixture."""

import json
import random

import pytest

from nft.data.benchmarks import load_benchmark
from nft.data.hub import REGISTRY, load_hub, load_local
from nft.reward import GraderPool
from tests.conftest import SHARED_BENCHMARKS

needs_shared = pytest.mark.skipif(
    not SHARED_BENCHMARKS.is_dir(), reason=f"{SHARED_BENCHMARKS} absent (the benchmark files live beside the checkout)"
)

EXPECTED = {
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "math500": 500,
    "minerva": 272,
    "olympiadbench": 675,
    "dapo-math-17k": 17917,
}


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts(name):
    s = load_local(name, SHARED_BENCHMARKS)
    assert len(s) == EXPECTED[name] == REGISTRY[name].expected
    assert s.skipped == 0
    assert all(p.question and p.answer for p in s)


@needs_shared
def test_normalisation():
    amc = load_local("amc23", SHARED_BENCHMARKS)
    assert amc[0].answer == "27" and not any(p.answer.endswith(".0") for p in amc)
    minerva = load_local("minerva", SHARED_BENCHMARKS)
    assert minerva[0].answer == "1.6"  # extracted from \\boxed{} in the solution
    oly = load_local("olympiadbench", SHARED_BENCHMARKS)
    assert not any(p.answer.startswith("$") for p in oly)
    dapo = load_local("dapo-math-17k", SHARED_BENCHMARKS)
    assert not any(p.question.startswith("Solve the following math problem") for p in dapo[:200])


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gold_graded_right_and_shuffled_wrong(name):
    """math-verify grades \\boxed{gold} right for >= 99% of problems and a shuffled answer wrong for >= 99%."""
    s = list(load_local(name, SHARED_BENCHMARKS))
    if name == "dapo-math-17k":
        s = random.Random(0).sample(s, 300)
    golds = [p.answer for p in s]
    rng = random.Random(1)
    shuffled = golds[:]
    for _ in range(10):
        rng.shuffle(shuffled)
    with GraderPool(workers=2) as pool:
        right, _ = pool.grade_many([f"The answer is \\boxed{{{g}}}." for g in golds], golds)
        wrong, _ = pool.grade_many([f"The answer is \\boxed{{{a}}}." for a in shuffled], golds)
    same = [a == g for a, g in zip(shuffled, golds)]  # identical answers are not wrong
    assert sum(right) / len(s) >= 0.99, [g for g, r in zip(golds, right) if not r][:10]
    wrongly_right = [golds[i] for i in range(len(s)) if wrong[i] and not same[i]]
    assert len(wrongly_right) / len(s) <= 0.01, wrongly_right[:10]


def test_hub_path_on_a_hub_shaped_fixture(tmp_path):
    """The hub loader reads a snapshot shaped like HuggingFaceH4/MATH-500 (data/test-*.parquet) and
    BytedTsinghua-SIA/DAPO-Math-17k (prompt with the DAPO template), with the same field mapping."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    snap = tmp_path / "math500"
    (snap / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "problem": "What is $1+1$?",
                    "solution": "\\boxed{2}",
                    "answer": "2",
                    "subject": "Algebra",
                    "level": 1,
                    "unique_id": "a",
                },
                {
                    "problem": "Half of one?",
                    "solution": "",
                    "answer": "\\frac{1}{2}",
                    "subject": "Algebra",
                    "level": 1,
                    "unique_id": "b",
                },
                {
                    "problem": "No answer here",
                    "solution": "",
                    "answer": "",
                    "subject": "x",
                    "level": 1,
                    "unique_id": "c",
                },
            ]
        ),
        snap / "data" / "test-00000-of-00001.parquet",
    )
    s = load_hub("math500", snapshot_dir=snap)
    assert [p.answer for p in s] == ["2", "\\frac{1}{2}"] and s.skipped == 1

    snap = tmp_path / "dapo"
    (snap / "data").mkdir(parents=True)
    prompt = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is 6*7?\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "data_source": "math_dapo",
                    "prompt": [{"role": "user", "content": prompt}],
                    "ability": "MATH",
                    "reward_model": {"ground_truth": "42", "style": "rule-lapse"},
                    "extra_info": {"index": "x"},
                }
            ]
        ),
        snap / "data" / "train-00000-of-00001.parquet",
    )
    s = load_hub("dapo-math-17k", snapshot_dir=snap)
    assert s[0].question == "What is 6*7?" and s[0].answer == "42"


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError) as err:
        load_benchmark("aime2099")
    assert "math500" in str(err.value) and "synth-medium" in str(err.value)
    with pytest.raises(FileNotFoundError, match="aime24"):
        load_local("aime24", tmp_path)
    with pytest.raises(FileNotFoundError, match="nft prepare"):
        load_benchmark("synth-easy", tmp_path)


def test_rows_without_answer_are_skipped_and_counted(tmp_path):
    (tmp_path / "amc23").mkdir()
    rows = [
        {"id": 0, "problem": "p0", "answer": 3.0},
        {"id": 1, "problem": "p1", "answer": None},
        {"id": 2, "problem": "p2"},
        {"id": 3, "problem": "p3", "answer": 2.5},
    ]
    (tmp_path / "amc23" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = load_local("amc23", tmp_path)
    assert [p.answer for p in s] == ["3", "2.5"] and s.skipped == 2
