"""Benchmark registry: every evaluation set and training set by name, from local files or the hub.

    from nft.data.benchmarks import load_benchmark, REGISTRY
    problems = load_benchmark("math500")              # ../shared/benchmarks or $NFT_BENCHMARKS_DIR
    problems = load_benchmark("synth-medium", "data") # the prepared synthetic set

Each entry records the Hugging Face hub id, split and field mapping that peers use, the local file alternative, the
answer normalisation the set needs and the paper's default k. Loading never touches the network unless
``source="hub"`` is asked for explicitly (the default study and the tests never do).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .synthetic import EVAL_SETS, read_jsonl


@dataclass
class Item:
    """One problem: ``id``, ``question``, ``answer`` (LaTeX, normalised), plus the source row's extras."""

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


class ProblemSet(list):
    """A list of problems with a ``name``, a content ``hash`` and the count of ``skipped`` rows (no answer)."""

    def __init__(self, items, name: str, skipped: int = 0):
        super().__init__(items)
        self.name, self.skipped = name, skipped
        h = hashlib.sha256()
        for p in items:
            h.update(f"{p.question}\x00{p.answer}\x01".encode())
        self.hash = h.hexdigest()[:16]


def synthetic_set(name: str, data_dir: str | Path) -> ProblemSet:
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: synthetic set {name!r} not found; run `nft prepare --config params.yaml --out {data_dir}` first"
        )
    return ProblemSet(read_jsonl(path), name)


def load_benchmark(name: str, data_dir: str | Path = "data", **kwargs) -> ProblemSet:
    """Load a set by registry name (synthetic sets from ``data_dir``)."""
    if name == "train" or name in EVAL_SETS:
        return synthetic_set(name, data_dir)
    from .hub import REGISTRY, load_registered

    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; registered: {sorted(['train', *EVAL_SETS, *REGISTRY])}")
    return load_registered(name, **kwargs)
