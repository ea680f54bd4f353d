"""The shape of the code: no import cycles between project modules (lazy imports inside functions count), no module
in nft/ or analysis/ over 400 lines and no function over 80."""

from __future__ import annotations

import ast

import pytest

from nft.deps import PACKAGES, _imports, _module_name
from tests.conftest import REPO

FILES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in FILES:
        name = _module_name(path)
        deps = _imports(ast.parse(path.read_text()), path)
        # a package's __init__ is not a cycle partner of its own modules through `from . import x`
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_small(path):
    """Modules of at most 400 lines ("" below), functions (nested ones too) of at most 80."""
    src = path.read_text()
    over = {""} if len(src.splitlines()) > 400 else set()
    over |= {
        f.name
        for f in ast.walk(ast.parse(src))
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.end_lineno - f.lineno + 1 > 80
    }
    assert not over, f"{path.name}: over the limits: {sorted(over)}"
