"""A seeded, verifiable synthetic math task: the embedded default's stand-in for DAPO-Math-17k and the benchmarks.

Usage::

    from nft.data.synthetic import SyntheticConfig, build_splits
    splits = build_splits(SyntheticConfig(seed=1234))   # {"train": [...], "synth-easy": [...], ...}

Families (each with tiers ``easy`` < ``medium`` < ``hard`` by operand size / number of steps):

- ``add``: a + b (1 / 1-2 / 2-3 digit operands);
- ``sub``: a - b, results may be negative (same sizes);
- ``mul``: a * b (1x1 / 1-2x1 / 2x1-2 digits, two-digit second factors with partial products);
- ``frac``: p/q + r/q (easy), p/q +- r/s (medium, hard), answered as ``\\frac{a}{b}`` in lowest terms (or an integer);
- ``linear``: solve a*x + b = c for an integer x (small / medium / large coefficients, negative x in hard);
- ``expr``: (a + b) * c - d and longer chains (2 / 3 / 4 operations).

Every problem carries a short worked solution (one line per step, then ``\\boxed{answer}``), which the ``base``
stage uses as supervised warm-start data. Gold answers are LaTeX strings graded by math-verify.

Splits: held-out sets ``synth-easy``, ``synth-medium``, ``synth-hard`` (all families of one tier each) are drawn
first; the training pool (all tiers) then rejects any question whose normalised text is in a held-out set, so the
splits never overlap.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

FAMILIES = ("add", "sub", "mul", "frac", "linear", "expr")
TIERS = ("easy", "medium", "hard")
EVAL_SETS = tuple(f"synth-{t}" for t in TIERS)


@dataclass
class Problem:
    """One question with its exact answer (LaTeX) and a worked solution ending in ``\\boxed{answer}``."""

    id: str
    family: str
    tier: str
    question: str
    answer: str
    solution: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SyntheticConfig:
    """The synthetic task (the ``data`` section of params.yaml)."""

    seed: int = 1234
    """seed of the generator; the splits are a pure function of this config."""
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    """skill families in the training pool and the held-out sets (subset of add, sub, mul, frac, linear, expr)."""
    tiers: list[str] = field(default_factory=lambda: list(TIERS))
    """difficulty tiers in the training pool (subset of easy, medium, hard)."""
    train_size: int = 20000
    """questions in the training pool."""
    eval_size: int = 300
    """questions in each held-out set (synth-easy / synth-medium / synth-hard)."""

    def __post_init__(self):
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ValueError(f"data.families: unknown skill family {bad}; known: {list(FAMILIES)}")
        bad = [t for t in self.tiers if t not in TIERS]
        if bad:
            raise ValueError(f"data.tiers: unknown tier {bad}; known: {list(TIERS)}")
        if not self.families:
            raise ValueError("data.families: at least one family is needed")
        if not self.tiers:
            raise ValueError("data.tiers: at least one tier is needed")
        if self.train_size < 1 or self.eval_size < 1:
            raise ValueError(f"data.train_size / data.eval_size: must be >= 1, got {self.train_size}, {self.eval_size}")


# ----------------------------------------------------------------------------------------------------------------------
# Families: rng, tier -> (question, answer, solution lines)
# ----------------------------------------------------------------------------------------------------------------------
def _digits(rng: random.Random, lo: int, hi: int) -> int:
    """A positive integer with between lo and hi digits."""
    d = rng.randint(lo, hi)
    return rng.randint(10 ** (d - 1) if d > 1 else 1, 10**d - 1)


def _fmt(x: int) -> str:
    return f"({x})" if x < 0 else str(x)


def _frac_tex(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def _frac_txt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


_SIZES = {"easy": (1, 1), "medium": (1, 2), "hard": (2, 3)}


def gen_add(rng, tier):
    a, b = _digits(rng, *_SIZES[tier]), _digits(rng, *_SIZES[tier])
    return f"What is {a} + {b}?", str(a + b), [f"{a} + {b} = {a + b}"]


def gen_sub(rng, tier):
    a, b = _digits(rng, *_SIZES[tier]), _digits(rng, *_SIZES[tier])
    return f"What is {a} - {b}?", str(a - b), [f"{a} - {b} = {a - b}"]


def gen_mul(rng, tier):
    da, db = {"easy": ((1, 1), (1, 1)), "medium": ((1, 2), (1, 1)), "hard": ((2, 2), (1, 2))}[tier]
    a, b = _digits(rng, *da), _digits(rng, *db)
    if tier == "hard":  # split the second factor: one partial product per digit
        tens, ones = divmod(b, 10)
        steps = [f"{a} * {tens * 10} = {a * tens * 10}"]
        if ones:
            steps += [f"{a} * {ones} = {a * ones}", f"{a * tens * 10} + {a * ones} = {a * b}"]
    else:
        steps = [f"{a} * {b} = {a * b}"]
    return f"What is {a} * {b}?", str(a * b), steps


def gen_frac(rng, tier):
    top = {"easy": 9, "medium": 6, "hard": 10}[tier]
    q = rng.randint(2, top)
    s = q if tier == "easy" else rng.randint(2, top)
    p, r = rng.randint(1, q - 1), rng.randint(1, s - 1)
    op = "+" if tier == "easy" or rng.random() < 0.5 else "-"
    x, y = Fraction(p, q), Fraction(r, s)
    res = x + y if op == "+" else x - y
    den = q * s // _gcd(q, s)
    raw = p * den // q + (1 if op == "+" else -1) * (r * den // s)
    if q == s:
        steps = [f"{p}/{q} {op} {r}/{s} = {raw}/{den}"]
    else:
        steps = [f"{p}/{q} {op} {r}/{s} = {p * den // q}/{den} {op} {r * den // s}/{den}", f"= {raw}/{den}"]
    if _frac_txt(res) != f"{raw}/{den}":
        steps.append(f"= {_frac_txt(res)}")
    return f"Compute {p}/{q} {op} {r}/{s}. Give the answer as a fraction in lowest terms.", _frac_tex(res), steps


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def gen_linear(rng, tier):
    amax, xmax = {"easy": (5, 9), "medium": (9, 20), "hard": (15, 30)}[tier]
    a = rng.randint(2, amax)
    x = rng.randint(-xmax if tier == "hard" else 1, xmax)
    b = rng.randint(1, 5 * amax)
    c = a * x + b
    return (f"Solve for x: {a}x + {b} = {c}.", str(x), [f"{a}x = {c} - {b} = {c - b}", f"x = {c - b} / {a} = {x}"])


def gen_expr(rng, tier):
    n_ops = {"easy": 2, "medium": 3, "hard": 4}[tier]
    hi = {"easy": 9, "medium": 12, "hard": 20}[tier]
    value = rng.randint(1, hi)
    text = str(value)
    steps = []
    for i in range(n_ops):
        op = rng.choice("+-*" if i else "+-")
        y = rng.randint(2, 9) if op == "*" else rng.randint(1, hi)
        new = value + y if op == "+" else value - y if op == "-" else value * y
        steps.append(f"{_fmt(value)} {op} {y} = {new}")
        text = f"({text}) {op} {y}" if op == "*" and i else f"{text} {op} {y}"
        value = new
    return f"Evaluate {text}.", str(value), steps


GENERATORS: dict[str, Callable] = {
    "add": gen_add,
    "sub": gen_sub,
    "mul": gen_mul,
    "frac": gen_frac,
    "linear": gen_linear,
    "expr": gen_expr,
}


def normalise(question: str) -> str:
    """The key for split disjointness: lower case, no whitespace."""
    return "".join(question.lower().split())


def make_problem(rng: random.Random, family: str, tier: str, index: int, split: str) -> Problem:
    q, a, steps = GENERATORS[family](rng, tier)
    solution = "\n".join(steps) + f"\nThe answer is \\boxed{{{a}}}."
    return Problem(f"{split}-{index:06d}", family, tier, q, a, solution)


def build_splits(cfg: SyntheticConfig) -> dict[str, list[Problem]]:
    """The held-out sets (one tier each, all families, no duplicates) and the disjoint training pool."""
    out: dict[str, list[Problem]] = {}
    held_out: set[str] = set()
    for tier in TIERS:
        rng = random.Random(f"{cfg.seed}-eval-{tier}")
        items: list[Problem] = []
        seen: set[str] = set()
        attempts = 0
        while len(items) < cfg.eval_size:
            attempts += 1
            if attempts > 50 * cfg.eval_size:
                raise ValueError(f"data.eval_size: cannot draw {cfg.eval_size} distinct {tier} questions")
            fam = cfg.families[len(items) % len(cfg.families)]
            p = make_problem(rng, fam, tier, len(items), f"synth-{tier}")
            key = normalise(p.question)
            if key in seen or key in held_out:  # held-out sets are disjoint from each other too
                continue
            seen.add(key)
            items.append(p)
        held_out |= seen
        out[f"synth-{tier}"] = items
    rng = random.Random(f"{cfg.seed}-train")
    train: list[Problem] = []
    attempts = 0
    while len(train) < cfg.train_size:
        attempts += 1
        if attempts > 50 * cfg.train_size:
            raise ValueError(f"data.train_size: cannot draw {cfg.train_size} questions outside the held-out sets")
        fam, tier = rng.choice(cfg.families), rng.choice(cfg.tiers)
        p = make_problem(rng, fam, tier, len(train), "train")
        if normalise(p.question) in held_out:
            continue
        train.append(p)
    out["train"] = train
    return out


def write_jsonl(path, problems: list[Problem]) -> None:
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps(p.to_json()) + "\n")


def read_jsonl(path) -> list[Problem]:
    with open(path) as f:
        return [Problem(**json.loads(line)) for line in f if line.strip()]


def data_hash(problems: list[Problem]) -> str:
    """A short content hash of a split (logged as an MLflow tag)."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps(p.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:16]
