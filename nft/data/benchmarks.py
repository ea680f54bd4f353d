"""Benchmark registry: every evaluation set and training set by name, from local files or the hub.

    from nft.data.benchmarks import load_benchmark
    problems = load_benchmark("math500")              # study.benchmarks_dir, $NFT_BENCHMARKS_DIR or ../shared/benchmarks
    problems = load_benchmark("synth-medium", "data") # the prepared synthetic set

The registered sets (``nft.data.hub.REGISTRY``) record the Hugging Face hub id, split and field mapping, the local
files and the paper's default k. Loading never touches the network unless ``study.benchmarks_source: hub`` asks for
it (the default study and the tests never do).
"""

from __future__ import annotations

from pathlib import Path

from .problems import Item, ProblemSet
from .synthetic import EVAL_SETS, read_jsonl

__all__ = ["Item", "ProblemSet", "load_benchmark", "synthetic_set"]


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
