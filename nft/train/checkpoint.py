"""The run folder's durable state: its fingerprint (what its results depend on) and checkpoints (weights, optimizer,
RNG streams, data cursor, step), written atomically so that a killed run resumes bit-identically.

Integrity: every checkpoint holds ``manifest.json`` (each file's size and sha256, and the step), written last; the
last two checkpoints are kept (``checkpoint``, ``checkpoint.prev``). On resume the newest one whose files match their
manifest and whose state loads is used; one that fails (cut short by a full disk or a partial copy, a bad block, no
manifest) is set aside as ``checkpoint.bad-N`` with one line saying why, and the previous one is tried; with none
left the run restarts from step 0, saying so."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..dist import Dist
from ..io import atomic_write_json, staging_dir, staging_path
from .seeds import Cursor


def fingerprint(resolved: dict, train_set, val_sets: dict, model_dir: str) -> str:
    """What a run's results depend on: its resolved config, the data and the base model (its pretrain summary, or
    its config files for hub models). A run folder with another fingerprint is not resumed."""
    h = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode())
    h.update(train_set.hash.encode())
    for name in sorted(val_sets):
        h.update(val_sets[name].hash.encode())
    for f in ("pretrain.json", "config.json", "model.safetensors.index.json"):
        p = Path(model_dir) / f
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:20]


#: the checkpoint folders of a run, newest first
CHECKPOINTS = ("checkpoint", "checkpoint.prev")
MANIFEST = "manifest.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int, dist: Dist | None = None) -> None:
    """``manifest.json``: every file under ``folder`` with its size and sha256 (written last, by rank 0: its presence
    says the checkpoint is complete). A collective under several processes: each rank hashes its share of the files
    (every ``world``-th, on the shared checkpoint folder) and rank 0 gathers the hashes."""
    dist = dist or Dist()
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    mine = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in paths[dist.rank :: dist.world]
    }
    parts = dist.gather(mine) if dist.world > 1 else [mine]
    if dist.is_main:
        files = {k: v for part in parts for k, v in part.items()}
        atomic_write_json(folder / MANIFEST, {"step": step, "files": dict(sorted(files.items()))})


def check_manifest(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact checkpoint (None when it is)."""
    man = folder / MANIFEST
    if not man.is_file():
        return "no manifest (the checkpoint was not finished)"
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if file_sha256(p) != meta["sha256"]:
            return f"{rel} fails its sha256"
    return None


def save_checkpoint(run_dir: Path, tokenizer, engine, cursor: Cursor, step: int) -> None:
    """Atomic (built in a staging folder with its manifest, then rotated in: the previous checkpoint becomes
    ``checkpoint.prev``). A collective: every rank calls; rank 0 writes the model, ``state.pt`` and the manifest,
    every DeepSpeed rank its optimizer shards."""
    dist = engine.dist
    final = run_dir / CHECKPOINTS[0]
    tmp = staging_dir(final) if dist.is_main else staging_path(final)
    dist.barrier()
    engine.save_model(tmp / "model", tokenizer)
    engine_state = engine.save_state(tmp)
    dist.barrier()
    if dist.is_main:
        torch.save(
            {
                "engine": engine_state,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "cursor": cursor.state(),
                "step": step,
            },
            tmp / "state.pt",
        )
    dist.barrier()
    write_manifest(tmp, step, dist)
    if dist.is_main:
        _rotate(tmp, run_dir)
    dist.barrier()


def _rotate(tmp: Path, run_dir: Path) -> None:
    """``checkpoint`` -> ``checkpoint.prev`` (the older one deleted), then the new one in. A crash in between leaves
    the previous checkpoint under one of the two names."""
    latest, prev = (run_dir / n for n in CHECKPOINTS)
    if latest.exists():
        old = run_dir / ".checkpoint.prev.old"
        shutil.rmtree(old, ignore_errors=True)
        if prev.exists():
            prev.rename(old)
        latest.rename(prev)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(latest)


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / n / "state.pt").is_file() for n in CHECKPOINTS)


def _set_aside(folder: Path, why: str) -> None:
    n = 0
    while (folder.parent / f"checkpoint.bad-{n}").exists():
        n += 1
    bad = folder.parent / f"checkpoint.bad-{n}"
    folder.rename(bad)
    print(f"train: {folder} failed its check ({why}); set aside as {bad.name}", file=sys.stderr)


def usable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest and whose state loads; the ones that fail are set
    aside (renamed, one line each). None: no usable checkpoint (the run starts afresh)."""
    for name in CHECKPOINTS:
        folder = run_dir / name
        if not folder.is_dir():
            continue
        why = check_manifest(folder)
        if why is None:
            try:
                torch.load(folder / "state.pt", weights_only=False)
            except Exception as e:  # noqa: BLE001 - any failure to load makes it unusable
                why = f"state.pt does not load: {type(e).__name__}: {e}"[:300]
        if why is None:
            return folder
        _set_aside(folder, why)
    return None


def restore_checkpoint(ckpt: Path, engine, n_train: int, data_seed: int) -> tuple[Cursor, int]:
    """Load the engine state and the RNG streams of checkpoint folder ``ckpt`` (:func:`usable_checkpoint`); returns
    ``(cursor, step)``."""
    state = torch.load(ckpt / "state.pt", weights_only=False)
    engine.load_state(ckpt, state["engine"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return Cursor(n_train, data_seed, **state["cursor"]), state["step"]


def truncate_history(path: Path, last_step: int) -> None:
    """Drop the history rows written after the checkpoint a run resumes from."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
    path.write_text("".join(ln + "\n" for ln in keep))
