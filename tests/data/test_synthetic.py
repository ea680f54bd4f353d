import random

import pytest

from nft.config import ConfigError, from_dict
from nft.data.synthetic import EVAL_SETS, FAMILIES, TIERS, SyntheticConfig, build_splits, normalise
from nft.reward import grade

SMALL = SyntheticConfig(seed=7, train_size=3000, eval_size=120)


@pytest.fixture(scope="module")
def splits():
    return build_splits(SMALL)


def test_same_seed_same_questions(splits):
    again = build_splits(SMALL)
    for name in splits:
        assert [p.to_json() for p in splits[name]] == [p.to_json() for p in again[name]]
    other = build_splits(SyntheticConfig(seed=8, train_size=3000, eval_size=120))
    assert [p.question for p in other["train"]] != [p.question for p in splits["train"]]


def test_splits_sizes_and_disjoint(splits):
    assert set(splits) == {"train", *EVAL_SETS}
    assert len(splits["train"]) == 3000
    keys = {name: {normalise(p.question) for p in items} for name, items in splits.items()}
    for name in EVAL_SETS:
        assert len(splits[name]) == 120
        assert len(keys[name]) == 120  # no duplicates inside a held-out set
        assert not keys[name] & keys["train"]
        assert {p.tier for p in splits[name]} == {name.split("-")[1]}
        assert {p.family for p in splits[name]} == set(FAMILIES)
    for a in EVAL_SETS:
        for b in EVAL_SETS:
            if a < b:
                assert not keys[a] & keys[b]
    assert {p.family for p in splits["train"]} == set(FAMILIES)
    assert {p.tier for p in splits["train"]} == set(TIERS)


def _perturbed(answer: str) -> str:
    if answer.lstrip("-").isdigit():
        return str(int(answer) + 1)
    return answer.replace("}{", "1}{", 1)  # \frac{a}{b} -> \frac{a1}{b}


def test_gold_answers_grade_right_and_perturbed_wrong(splits):
    """Every gold answer (as its worked solution) is right against itself and a perturbed answer is wrong, by the
    project's math-verify grader."""
    sample = random.Random(0).sample(splits["train"], 150) + [p for n in EVAL_SETS for p in splits[n][:30]]
    for p in sample:
        assert grade(p.solution, p.answer), p
        assert grade(f"So \\boxed{{ {p.answer} }} .", p.answer), p  # spacing does not matter
        assert not grade(f"The result is ${p.answer}$", p.answer), p  # no box: not a final answer
        assert not grade(f"\\boxed{{{_perturbed(p.answer)}}}", p.answer), p
        assert not grade(f"x = \\boxed{{{_perturbed(p.answer)}}}", p.answer), p


def test_fractions_in_lowest_terms(splits):
    import re
    from math import gcd

    fr = [p for p in splits["train"] if p.family == "frac"]
    assert fr
    for p in fr:
        m = re.fullmatch(r"-?\\frac\{(\d+)\}\{(\d+)\}", p.answer)
        if m:
            assert gcd(int(m.group(1)), int(m.group(2))) == 1 and int(m.group(2)) > 1


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("families", ["add", "geometry"], "geometry"),
        ("tiers", ["easy", "insane"], "insane"),
        ("train_size", 0, "train_size"),
    ],
)
def test_bad_config_names_the_field(key, value, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(SyntheticConfig, {key: value}, "data")
    assert needle in str(err.value) and "data." in str(err.value)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="data.famlies"):
        from_dict(SyntheticConfig, {"famlies": ["add"]}, "data")
