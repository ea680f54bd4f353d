"""The code each DVC stage runs, derived from the imports: a stage is up to date only if none of it changed.

A stage's command enters the project at one function (``nft train`` -> ``nft.cli._cmd_train``) or module
(``python -m analysis``); its code is every project module that entry imports, transitively, lazy imports inside
functions included (they run when the command takes that path), plus the packages' ``__init__`` files Python
executes on the way. ``tests/test_dvc_pipeline.py`` checks that ``dvc.yaml`` lists exactly these files;
``python -m nft.deps`` prints them per stage.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("nft", "analysis")

#: each stage's entry: (module, function or None for the whole module)
STAGE_ENTRIES: dict[str, tuple[str, str | None]] = {
    "prepare": ("nft.cli", "_cmd_prepare"),
    "base": ("nft.cli", "_cmd_pretrain"),
    "train": ("nft.cli", "_cmd_train"),
    "evaluate": ("nft.cli", "_cmd_evaluate"),
    "evaluate-base": ("nft.cli", "_cmd_evaluate"),
    "analyze": ("analysis.__main__", None),
}


def module_path(name: str) -> Path | None:
    """The file of project module ``name`` (``pkg/mod.py`` or ``pkg/mod/__init__.py``), else None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(tree: ast.AST, path: Path) -> set[str]:
    """Project modules imported anywhere in ``tree`` (a module or one function of ``path``)."""
    pkg = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {m for m in out if module_path(m) is not None}


def _with_parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(roots: set[str]) -> set[Path]:
    """The files of ``roots`` and of every project module they import, transitively (parents' ``__init__`` too)."""
    todo = {m for r in roots for m in _with_parents(r)}
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or module_path(name) is None:
            continue
        seen.add(name)
        path = module_path(name)
        assert path is not None  # checked just above
        for m in _imports(ast.parse(path.read_text()), path):
            todo |= _with_parents(m)
    return cast("set[Path]", {module_path(m) for m in seen})  # only names with a file enter `seen`


def _called(tree: ast.Module, func: str) -> list[ast.FunctionDef]:
    """The module-level function ``func`` and those of the same module it calls, transitively (their lazy imports
    run when the command does)."""
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    todo, seen = [func], []
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.append(name)
        todo += [c.func.id for c in ast.walk(defs[name]) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
    return [defs[n] for n in seen]


def stage_code(stage: str) -> list[str]:
    """The project files stage ``stage`` runs, relative to the repository, sorted. Of the entry module, only its
    module-level imports and the entry function's count (the other commands' lazy imports do not run)."""
    module, func = STAGE_ENTRIES[stage]
    path = module_path(module)
    assert path is not None  # STAGE_ENTRIES names project modules
    tree = ast.parse(path.read_text())
    roots = _with_parents(module) - {module}
    if func is None:
        roots |= _imports(tree, path)
    else:
        body = ast.Module(
            body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))], type_ignores=[]
        )
        for entry in _called(tree, func):
            roots |= _imports(entry, path)
        roots |= _imports(body, path)
    files = closure(roots) | {path}
    return sorted(str(p.relative_to(REPO)) for p in files)


def main() -> int:
    for stage in sys.argv[1:] or STAGE_ENTRIES:
        print(f"{stage}:")
        for f in stage_code(stage):
            print(f"  - {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
