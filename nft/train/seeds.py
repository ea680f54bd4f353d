"""Seeds and the data order: one run seed drives everything; every other seed is derived from it and logged."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(seed: int, *names) -> int:
    """A stable 31-bit seed derived from the run seed and a label (independent streams per purpose)."""
    return random.Random(f"{seed}/" + "/".join(map(str, names))).getrandbits(31)


def seed_block(seed: int) -> dict[str, int]:
    """Seed python, numpy and torch with the run seed; return the run's seeds, logged as ``seed/*`` params."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return {
        "seed/run": seed,
        "seed/data_order": derive_seed(seed, "data"),
        "seed/sampling_base": derive_seed(seed, "sample"),
        "seed/validation": derive_seed(seed, "val"),
    }


class Cursor:
    """Seeded pass over the training set: a fresh permutation per epoch; state = (epoch, position)."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = self._make(epoch)

    def _make(self, epoch: int) -> list[int]:
        perm = list(range(self.n))
        random.Random(f"{self.seed}-{epoch}").shuffle(perm)
        return perm

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._make(self.epoch)
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}
