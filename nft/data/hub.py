"""The paper's benchmarks and training set: local files (default) or the Hugging Face hub.

Local files are read from ``$NFT_BENCHMARKS_DIR`` or, failing that, ``../shared/benchmarks`` beside the checkout
(see its SOURCES.md). The hub path (``source="hub"``) downloads a dataset snapshot with ``huggingface_hub`` and
reads the split's files with the same field mapping; tests run it on a local folder shaped like the hub snapshot
(``snapshot_dir=...``), never over the network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .benchmarks import Item, ProblemSet

DAPO_PREFIX = re.compile(r"^Solve the following math problem step by step\..*?\n\n", re.S)
DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.\s*$", re.S)


def _strip_float(x) -> str:
    """AMC23 answers are floats (27.0 -> "27"; 0.5 stays "0.5")."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    s = str(x).strip()
    return s[:-2] if re.fullmatch(r"-?\d+\.0", s) else s


def _boxed_from_solution(solution: str) -> str | None:
    from ..reward import extract_boxed

    return extract_boxed(solution)


def _olympiad_answer(final_answer) -> str | None:
    """OlympiadBench's ``final_answer`` is a list of ``$...$`` strings; several answers are joined by ", "."""
    if not final_answer:
        return None
    parts = [a.strip().strip("$").strip() for a in final_answer]
    return ", ".join(p for p in parts if p) or None


def _dapo_question(prompt) -> str:
    text = prompt if isinstance(prompt, str) else prompt[0]["content"]
    text = DAPO_PREFIX.sub("", text)
    return DAPO_SUFFIX.sub("", text).strip()


@dataclass(frozen=True)
class Entry:
    """One registered set."""

    name: str
    local: tuple[str, ...]
    """files under the benchmarks root (concatenated in order)."""
    hub_id: str
    hub_split: str
    hub_config: str | None
    row: Callable[[dict], tuple[str | None, str | None, dict]]
    """source row -> (question, answer, meta); None answer: the row is skipped and counted."""
    default_k: int
    expected: int
    """rows in the paper's version of the set (checked by the tests)."""


def _row(q: str, a: Callable[[dict], str | None], meta: tuple[str, ...] = ()):
    return lambda r: (r.get(q), a(r), {m: r.get(m) for m in meta if m in r})


REGISTRY: dict[str, Entry] = {e.name: e for e in [
    Entry("aime24", ("aime24/test.jsonl",), "HuggingFaceH4/aime_2024", "train", None,
          _row("problem", lambda r: str(r["answer"]).strip() if r.get("answer") not in (None, "") else None, ("id",)),
          32, 30),
    Entry("aime25", ("aime25/test2025-I.jsonl", "aime25/test2025-II.jsonl"), "math-ai/aime25", "test", None,
          _row("problem", lambda r: str(r["answer"]).strip() if r.get("answer") not in (None, "") else None, ("id",)),
          32, 30),
    Entry("amc23", ("amc23/test.jsonl",), "math-ai/amc23", "test", None,
          lambda r: (r.get("problem") or r.get("question"),
                     _strip_float(r["answer"]) if r.get("answer") not in (None, "") else None, {"id": r.get("id")}),
          32, 40),
    Entry("math500", ("math500/test.jsonl",), "HuggingFaceH4/MATH-500", "test", None,
          _row("problem", lambda r: r.get("answer") or None, ("subject", "level", "unique_id")), 1, 500),
    Entry("minerva", ("minerva/test.jsonl",), "math-ai/minervamath", "test", None,
          lambda r: (r.get("problem") or r.get("question"),
                     (r["answer"] if isinstance(r.get("answer"), str) and r["answer"] else
                      _boxed_from_solution(r.get("solution") or "")), {"type": r.get("type")}),
          1, 272),
    Entry("olympiadbench", ("olympiadbench/test.jsonl",), "Hothan/OlympiadBench", "train", "OE_TO_maths_en_COMP",
          lambda r: (r.get("question"), _olympiad_answer(r.get("final_answer")),
                     {"unit": r.get("unit"), "answer_type": r.get("answer_type"), "id": r.get("id")}),
          1, 675),
    Entry("dapo-math-17k", ("train/dapo_math_17k/dapo_math_17k.parquet",), "BytedTsinghua-SIA/DAPO-Math-17k", "train",
          None,
          lambda r: (_dapo_question(r["prompt"]), str((r.get("reward_model") or {}).get("ground_truth") or "") or None,
                     {"index": (r.get("extra_info") or {}).get("index")}),
          1, 17917),
]}


def benchmarks_root() -> Path:
    env = os.environ.get("NFT_BENCHMARKS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"


def read_rows(path: Path) -> list[dict]:
    """Rows of a jsonl, json, parquet or ``datasets.save_to_disk`` folder."""
    if path.is_dir():
        import pyarrow as pa

        rows = []
        for f in sorted(path.glob("*.arrow")):
            with pa.memory_map(str(f)) as src:
                rows += pa.ipc.open_stream(src).read_all().to_pylist()
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data if isinstance(data, list) else data.get("data", [])
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _to_set(entry: Entry, rows: list[dict]) -> ProblemSet:
    items, skipped = [], 0
    for i, r in enumerate(rows):
        q, a, meta = entry.row(r)
        if not q or a is None or str(a).strip() == "":
            skipped += 1
            continue
        items.append(Item(id=f"{entry.name}-{i}", question=q, answer=str(a).strip(), meta=meta))
    return ProblemSet(items, entry.name, skipped)


def load_local(name: str, root: str | Path | None = None) -> ProblemSet:
    entry = REGISTRY[name]
    root = Path(root) if root else benchmarks_root()
    rows = []
    for rel in entry.local:
        path = root / rel
        if not path.exists():
            raise FileNotFoundError(f"{path}: benchmark file for {name!r} not found (set NFT_BENCHMARKS_DIR to the "
                                    f"folder holding {rel}, or load it with source='hub')")
        rows += read_rows(path)
    return _to_set(entry, rows)


def load_hub(name: str, snapshot_dir: str | Path | None = None) -> ProblemSet:
    """The set from the Hugging Face hub (``snapshot_dir``: an already downloaded / fixture snapshot folder)."""
    entry = REGISTRY[name]
    if snapshot_dir is None:
        from huggingface_hub import snapshot_download

        snapshot_dir = snapshot_download(entry.hub_id, repo_type="dataset")
    root = Path(snapshot_dir)
    base = root / entry.hub_config if entry.hub_config and (root / entry.hub_config).is_dir() else root
    files = [p for pat in (f"**/{entry.hub_split}-*.parquet", f"**/{entry.hub_split}.parquet",
                           f"**/{entry.hub_split}*.jsonl", f"**/{entry.hub_split}.json")
             for p in sorted(base.glob(pat))]
    if not files:
        raise FileNotFoundError(f"{root}: no files for split {entry.hub_split!r} of {entry.hub_id}")
    rows = []
    for f in dict.fromkeys(files):
        rows += read_rows(f)
    return _to_set(entry, rows)


def load_registered(name: str, source: str = "local", root: str | Path | None = None,
                    snapshot_dir: str | Path | None = None) -> ProblemSet:
    if source == "local":
        return load_local(name, root)
    if source == "hub":
        return load_hub(name, snapshot_dir)
    raise ValueError(f"source: expected 'local' or 'hub', got {source!r}")
