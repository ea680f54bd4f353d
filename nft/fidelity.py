"""The fidelity ledger (``experiments/fidelity/ledger.yaml``): every key on which a paper preset differs from the defaults,
with the official file:line it reproduces and the tests that check it, or the reason for a choice, or the platform
machinery it runs; ``docs/fidelity.md`` is generated from it and from the presets' composed values.

    python -m nft.fidelity            # check the ledger, rewrite docs/fidelity.md
    python -m nft.fidelity --check    # exit 1 if the ledger is incomplete or wrong, or docs/fidelity.md is stale
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
LEDGER = REPO / "experiments" / "fidelity" / "ledger.yaml"
DOC = REPO / "docs" / "fidelity.md"
_SOURCE = re.compile(r"[\w.]+\.(sh|py):\d+")


def load(path: Path = LEDGER) -> dict:
    return yaml.safe_load(Path(path).read_text())


def composed(preset: str | Path | None) -> dict[str, Any]:
    """A preset over the defaults (the defaults alone for None), as flat ``section.key`` values."""
    from .config import compose_study
    from .flat import flatten

    if preset is not None:
        return flatten(compose_study(preset))
    with tempfile.TemporaryDirectory() as d:
        empty = Path(d) / "defaults.yaml"
        empty.write_text("{}\n")
        return flatten(compose_study(empty))


def _presets(ledger: dict, repo: Path) -> dict[str, dict[str, Any]]:
    return {Path(p).stem: composed(repo / p) for p in ledger["presets"]}


def _entries(ledger: dict) -> list[tuple[str, dict]]:
    return [("official", e) for e in ledger.get("official") or []] + [("chosen", e) for e in ledger.get("chosen") or []]


def _matches(pattern: str, keys) -> list[str]:
    return sorted(k for k in keys if fnmatch.fnmatchcase(k, pattern))


def _test_exists(node: str, repo: Path) -> bool:
    path, _, name = node.partition("::")
    file = repo / path
    if not file.is_file() or not name:
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(f, ast.FunctionDef) and f.name == name for f in tree.body)


def check(ledger: dict, repo: Path = REPO) -> list[str]:
    """Everything wrong with ``ledger`` against the presets it names: one line each (empty: all good)."""
    defaults, presets = composed(None), _presets(ledger, repo)
    patterns = [k for _, e in _entries(ledger) for k in e["keys"]] + list(ledger.get("platform") or {})
    problems = []
    for name, values in presets.items():
        differing = [k for k, v in values.items() if k not in defaults or defaults[k] != v]
        problems += [
            f"{name}: {k} differs from the default and has no ledger entry"
            for k in differing
            if not any(fnmatch.fnmatchcase(k, p) for p in patterns)
        ]
    every = set().union(*(set(v) for v in presets.values()))
    problems += [f"ledger: {p} names no key of the presets" for p in patterns if not _matches(p, every)]
    for kind, e in _entries(ledger):
        where = f"ledger: {kind} '{e.get('setting')}'"
        if kind == "official" and not _SOURCE.search(e.get("source") or ""):
            problems.append(f"{where}: source names no file:line")
        if kind == "official" and not (e.get("value") or e.get("test")):
            problems.append(f"{where}: neither a value nor a test")
        if kind == "chosen" and not e.get("why"):
            problems.append(f"{where}: no why")
        problems += [f"{where}: test {t} not found" for t in e.get("test") or [] if not _test_exists(t, repo)]
        for key, want in (e.get("value") or {}).items():
            for name, values in presets.items():
                expected = want[name] if isinstance(want, dict) else want
                if values.get(key) != expected:
                    problems.append(f"{name}: {key} is {values.get(key)!r}, the official value is {expected!r}")
    return problems


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if v == "":
        return '""'
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v).replace("|", "\\|")


def _values(keys: list[str], values: dict[str, Any]) -> str:
    shown = [f"`{k}` {_fmt(values[k])}" for p in keys for k in _matches(p, values)]
    return "<br>".join(shown) or "–"


def _tests(e: dict) -> str:
    named = [f"`{t.split('::')[1]}`" for t in e.get("test") or []]
    return (
        "<br>".join(named + (["the values above (`test_presets_hold_the_ledgers_values`)"] if e.get("value") else []))
        or "–"
    )


def _table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def render(ledger: dict, repo: Path = REPO) -> str:
    """docs/fidelity.md: the ledger's tables, with each preset's and the defaults' actual values."""
    defaults, presets = composed(None), _presets(ledger, repo)
    names = list(presets)
    entries = _entries(ledger)
    official = [
        [e["setting"].replace("|", "\\|"), e["source"].replace("|", "\\|")]
        + [_values(e["keys"], presets[n]) for n in names]
        + [_values(e["keys"], defaults), _tests(e)]
        for kind, e in entries
        if kind == "official"
    ]
    chosen = [
        [e["setting"]] + [_values(e["keys"], presets[n]) for n in names] + [e["why"], _tests(e)]
        for kind, e in entries
        if kind == "chosen"
    ]
    platform = [[f"`{k}`", v] for k, v in (ledger.get("platform") or {}).items()]
    lines = [
        "# Fidelity to the official code",
        "",
        "Generated by `python -m nft.fidelity` from [experiments/fidelity/ledger.yaml]"
        "(../experiments/fidelity/ledger.yaml) and the presets' composed values; edit the ledger, not this file. "
        f"Files are {ledger['source']} unless named otherwise. The paper presets set the official value; the "
        "embedded default keeps the principled one.",
    ]
    head = ["setting", "official source", *names, "embedded default", "tests"]
    lines += _table("Official behaviours the presets reproduce", head, official)
    lines += _table("Choices where the official code is silent", ["setting", *names, "why", "tests"], chosen)
    lines += _table("Platform keys (no official counterpart)", ["keys", "what"], platform)
    if ledger.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ledger["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nft.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 if anything is wrong or stale")
    args = p.parse_args(argv)
    ledger = load()
    problems = check(ledger)
    text = render(ledger)
    if args.check and DOC.read_text() != text:
        problems.append(f"{DOC.relative_to(REPO)} is stale: run python -m nft.fidelity")
    for line in problems:
        print(f"fidelity: {line}", file=sys.stderr)
    if problems:
        return 1
    if not args.check:
        from .io import atomic_write

        atomic_write(DOC, text)
        print(f"fidelity: {DOC.relative_to(REPO)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
