"""Atomic writes: a reader (DVC, a resumed run, another worker) sees the old file or folder or the new one, never
half of one. The one helper for every result, checkpoint and run-folder write in the project."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a sibling temporary file and ``os.replace`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent))


def staging_path(final: str | Path) -> Path:
    """Where :func:`staging_dir` builds ``final`` (the same on every rank of a launcher)."""
    final = Path(final)
    return final.parent / f".{final.name}.tmp"


def staging_dir(final: str | Path) -> Path:
    """An empty sibling folder to build ``final`` in (``.NAME.tmp``); hand it to :func:`replace_dir` when done."""
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Put the finished folder ``tmp`` in place of ``final``: the old one is moved aside first and deleted last, so
    a crash leaves either the old folder or the new one under ``final``."""
    tmp, final = Path(tmp), Path(final)
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
