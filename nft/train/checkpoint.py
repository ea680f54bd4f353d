"""The run folder's durable state: its fingerprint (what its results depend on) and checkpoints (weights, optimizer,
RNG streams, data cursor, step), written atomically so that a killed run resumes bit-identically."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..io import replace_dir, staging_dir, staging_path
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


def save_checkpoint(run_dir: Path, tokenizer, engine, cursor: Cursor, step: int) -> None:
    """Atomic (built in a staging folder, then swapped in; see ``nft.io``). A collective: every rank calls; rank 0
    writes the model and ``state.pt``, every DeepSpeed rank its optimizer shards."""
    dist = engine.dist
    final = run_dir / "checkpoint"
    tmp = staging_dir(final) if dist.is_main else staging_path(final)
    dist.barrier()
    engine.save_model(tmp / "model", tokenizer)
    engine_state = engine.save_state(tmp)
    dist.barrier()
    if dist.is_main:
        torch.save({
            "engine": engine_state,
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "cursor": cursor.state(),
            "step": step,
        }, tmp / "state.pt")
        replace_dir(tmp, final)
    dist.barrier()


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoint" / "state.pt").is_file()


def restore_checkpoint(run_dir: Path, engine, n_train: int, data_seed: int) -> tuple[Cursor, int]:
    """Load the engine state and the RNG streams of the last checkpoint; returns ``(cursor, step)``."""
    ckpt = run_dir / "checkpoint"
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
