"""The paper's benchmarks and training set: local files (default) or the Hugging Face hub.

Local files are read from the study's ``study.benchmarks_dir``, else ``$NFT_BENCHMARKS_DIR``, else
``../shared/benchmarks`` beside the checkout (see its SOURCES.md). ``nft data fetch --out DIR`` writes that layout from
the hub (:func:`fetch`), with each file's repository, revision and sha256 in ``DIR/SOURCES.json``. The hub path
(``study.benchmarks_source: hub``) downloads a dataset snapshot with ``huggingface_hub`` at load time and reads the
split's files with the same field mapping; tests run both on local folders shaped like the hub's, never over the
network.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from .problems import Item, ProblemSet

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


REGISTRY: dict[str, Entry] = {
    e.name: e
    for e in [
        Entry(
            "aime24",
            ("aime24/test.jsonl",),
            "HuggingFaceH4/aime_2024",
            "train",
            None,
            _row("problem", lambda r: str(r["answer"]).strip() if r.get("answer") not in (None, "") else None, ("id",)),
            32,
            30,
        ),
        Entry(
            "aime25",
            ("aime25/test2025-I.jsonl", "aime25/test2025-II.jsonl"),
            "math-ai/aime25",
            "test",
            None,
            _row("problem", lambda r: str(r["answer"]).strip() if r.get("answer") not in (None, "") else None, ("id",)),
            32,
            30,
        ),
        Entry(
            "amc23",
            ("amc23/test.jsonl",),
            "math-ai/amc23",
            "test",
            None,
            lambda r: (
                r.get("problem") or r.get("question"),
                _strip_float(r["answer"]) if r.get("answer") not in (None, "") else None,
                {"id": r.get("id")},
            ),
            32,
            40,
        ),
        Entry(
            "math500",
            ("math500/test.jsonl",),
            "HuggingFaceH4/MATH-500",
            "test",
            None,
            _row("problem", lambda r: r.get("answer") or None, ("subject", "level", "unique_id")),
            1,
            500,
        ),
        Entry(
            "minerva",
            ("minerva/test.jsonl",),
            "math-ai/minervamath",
            "test",
            None,
            lambda r: (
                r.get("problem") or r.get("question"),
                (
                    r["answer"]
                    if isinstance(r.get("answer"), str) and r["answer"]
                    else _boxed_from_solution(r.get("solution") or "")
                ),
                {"type": r.get("type")},
            ),
            1,
            272,
        ),
        Entry(
            "olympiadbench",
            ("olympiadbench/test.jsonl",),
            "Hothan/OlympiadBench",
            "train",
            "OE_TO_maths_en_COMP",
            lambda r: (
                r.get("question"),
                _olympiad_answer(r.get("final_answer")),
                {"unit": r.get("unit"), "answer_type": r.get("answer_type"), "id": r.get("id")},
            ),
            1,
            675,
        ),
        Entry(
            "dapo-math-17k",
            ("train/dapo_math_17k/dapo_math_17k.parquet",),
            "BytedTsinghua-SIA/DAPO-Math-17k",
            "train",
            None,
            lambda r: (
                _dapo_question(r["prompt"]),
                str((r.get("reward_model") or {}).get("ground_truth") or "") or None,
                {"index": (r.get("extra_info") or {}).get("index")},
            ),
            1,
            17917,
        ),
    ]
}


#: where this process reads the registered sets: set from the study file by :func:`use_benchmarks` (``nft`` does it
#: for every command that loads a study); empty: ``$NFT_BENCHMARKS_DIR``, else ``../shared/benchmarks``
_SOURCE = {"source": "local", "root": ""}


def use_benchmarks(source: str = "local", root: str = "") -> None:
    """The study's ``study.benchmarks_source`` and ``study.benchmarks_dir`` for every later load in this process."""
    if source not in ("local", "hub"):
        raise ValueError(f"study.benchmarks_source: expected 'local' or 'hub', got {source!r}")
    _SOURCE.update(source=source, root=root)


def benchmarks_source() -> str:
    return _SOURCE["source"]


def benchmarks_root() -> Path:
    if _SOURCE["root"]:
        return Path(_SOURCE["root"])
    env = os.environ.get("NFT_BENCHMARKS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"


def missing_files(name: str, root: str | Path | None = None) -> list[Path]:
    """The local files of the registered set ``name`` that are not under ``root`` (default: :func:`benchmarks_root`)."""
    root = Path(root) if root else benchmarks_root()
    return [root / rel for rel in REGISTRY[name].local if not (root / rel).exists()]


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
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


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
            raise FileNotFoundError(
                f"{path}: benchmark file for {name!r} not found (set NFT_BENCHMARKS_DIR to the "
                f"folder holding {rel}, or load it with source='hub')"
            )
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
    files = [
        p
        for pat in (
            f"**/{entry.hub_split}-*.parquet",
            f"**/{entry.hub_split}.parquet",
            f"**/{entry.hub_split}*.jsonl",
            f"**/{entry.hub_split}.json",
        )
        for p in sorted(base.glob(pat))
    ]
    if not files:
        raise FileNotFoundError(f"{root}: no files for split {entry.hub_split!r} of {entry.hub_id}")
    rows = []
    for f in dict.fromkeys(files):
        rows += read_rows(f)
    return _to_set(entry, rows)


def load_registered(
    name: str, source: str | None = None, root: str | Path | None = None, snapshot_dir: str | Path | None = None
) -> ProblemSet:
    source = source or benchmarks_source()
    if source == "local":
        return load_local(name, root)
    if source == "hub":
        return load_hub(name, snapshot_dir)
    raise ValueError(f"source: expected 'local' or 'hub', got {source!r}")


def _hub_rows(entry: Entry, revision: str | None) -> tuple[list[dict], str]:
    """The split's rows at ``revision`` (default: the dataset's newest commit, resolved first so that the record names
    the commit read), from the hub through ``datasets``: the one function here that reaches the network."""
    import datasets
    from huggingface_hub import HfApi

    # the hub sends a dataset's commit sha with its info (the stubs allow None for partial listings)
    revision = revision or cast(str, HfApi().dataset_info(entry.hub_id).sha)
    return datasets.load_dataset(
        entry.hub_id, entry.hub_config, split=entry.hub_split, revision=revision
    ).to_list(), revision


def fetch(
    names: list[str],
    out: str | Path,
    revisions: dict[str, str] | None = None,
    rows_of: Callable[[Entry, str | None], tuple[list[dict], str]] | None = None,
) -> dict:
    """Write the registered sets ``names`` under ``out`` in the layout :func:`load_local` reads, as the hub serves
    them (rows unchanged: the registry's field mapping applies when they are loaded), and ``out/SOURCES.json`` with
    each file's repository id, revision and sha256. ``rows_of(entry, revision)`` returns ``(rows, revision)``; by
    default the hub, through ``datasets``. Each file is written whole or not at all; returns the sources written."""
    import hashlib

    from ..io import atomic_write

    unknown = sorted(set(names) - set(REGISTRY))
    if unknown:
        raise ValueError(f"nft data fetch: unknown set(s) {unknown}; registered: {sorted(REGISTRY)}")
    out = Path(out)
    index = out / "SOURCES.json"
    sources = json.loads(index.read_text()) if index.is_file() else {}
    for name in names:
        entry = REGISTRY[name]
        rows, revision = (rows_of or _hub_rows)(entry, (revisions or {}).get(name))
        parts = _split_like_local(entry, rows)
        for rel, part in parts.items():
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_rows(path, part)
            sources[rel] = {
                "set": name,
                "repo_id": entry.hub_id,
                "config": entry.hub_config,
                "split": entry.hub_split,
                "revision": revision,
                "rows": len(part),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        atomic_write(index, json.dumps(sources, indent=2, sort_keys=True) + "\n")
    return sources


def _split_like_local(entry: Entry, rows: list[dict]) -> dict[str, list[dict]]:
    """The rows spread over the set's local files: one file takes them all; AIME25's two files take parts I and II
    (ids ``II-...`` in the second), else the first and second half."""
    if len(entry.local) == 1:
        return {entry.local[0]: rows}
    second = [str(r.get("id", "")).startswith("II") for r in rows]
    if not any(second) or all(second):
        second = [i >= (len(rows) + 1) // 2 for i in range(len(rows))]
    return {
        entry.local[0]: [r for r, s in zip(rows, second) if not s],
        entry.local[1]: [r for r, s in zip(rows, second) if s],
    }


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    tmp.replace(path)
