"""`nft data fetch` writes the layout the local loader reads, with each file's repository, revision and sha256; the
hub is replaced by a loader of local files shaped like the hub's (the one function that reaches the network is
``nft.data.hub._hub_rows``)."""

from __future__ import annotations

import hashlib
import json

import pytest

from nft.cli import main
from nft.data import hub
from nft.data.hub import REGISTRY, fetch, load_local, read_rows
from tests.conftest import SHARED_BENCHMARKS

pytestmark = pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason=f"{SHARED_BENCHMARKS} absent")
SETS = ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench", "dapo-math-17k"]


def local_hub(entry, revision):
    """The split as `datasets` serves it: read through `datasets` from local files of the same rows."""
    import datasets

    files = [str(SHARED_BENCHMARKS / rel) for rel in entry.local]
    kind = "parquet" if files[0].endswith(".parquet") else "json"
    rows = datasets.load_dataset(kind, data_files=files, split="train").to_list()
    return rows, revision or "0123456789abcdef0123456789abcdef01234567"


def test_fetch_writes_what_the_local_loader_reads(tmp_path):
    sources = fetch(SETS, tmp_path, rows_of=local_hub)
    for name in SETS:
        assert load_local(name, tmp_path).hash == load_local(name, SHARED_BENCHMARKS).hash, name
    assert set(sources) == {rel for n in SETS for rel in REGISTRY[n].local}
    assert json.loads((tmp_path / "SOURCES.json").read_text()) == sources
    for rel, src in sources.items():
        assert src["sha256"] == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
        assert src["repo_id"] == REGISTRY[src["set"]].hub_id and len(src["revision"]) == 40
        assert src["rows"] == len(read_rows(tmp_path / rel))
    assert sources["aime25/test2025-II.jsonl"]["rows"] == 15  # parts I and II by id


def test_nft_data_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "_hub_rows", local_hub)
    assert main(["data", "fetch", "--out", str(tmp_path / "b"), "--sets", "amc23,math500"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("data fetch: math-ai/amc23@0123456789ab -> ")
    assert load_local("math500", tmp_path / "b").hash == load_local("math500", SHARED_BENCHMARKS).hash
    assert main(["data", "fetch", "--out", str(tmp_path / "c"), "--sets", "nope"]) == 2
    assert "unknown set(s) ['nope']" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_the_study_chooses_local_files_or_the_hub(tmp_path, monkeypatch):
    from nft.data.benchmarks import load_benchmark

    calls = []
    monkeypatch.setattr(hub, "load_hub", lambda name, snapshot_dir=None: calls.append(name) or [])
    hub.use_benchmarks("local", str(SHARED_BENCHMARKS))
    try:
        assert len(load_benchmark("amc23")) == 40 and not calls
        hub.use_benchmarks("hub")
        load_benchmark("amc23")
        assert calls == ["amc23"]
        with pytest.raises(ValueError, match="study.benchmarks_source"):
            hub.use_benchmarks("ftp")
    finally:
        hub.use_benchmarks()
