"""The process group as the loop and the samplers see it: rank, world size and a few collectives (trivial in a single
process). Shared by ``nft.train`` and ``nft.rollout`` (a vLLM engine spanning several processes)."""

from __future__ import annotations

import os
from typing import Any


class Dist:
    """Rank, world size and the few collectives the loop needs; trivial in a single process."""

    def __init__(self):
        import torch.distributed as td

        on = td.is_available() and td.is_initialized()
        self.rank = td.get_rank() if on else 0
        self.world = td.get_world_size() if on else 1
        self._td = td

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self._td.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self._td.all_gather_object(out, obj)
        return out

    def sum(self, x: float) -> float:
        return float(sum(self.gather(x))) if self.world > 1 else x

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self._td.broadcast_object_list(box, src=0)
        return box[0]


def launched_world_size() -> int:
    """Processes started by the launcher (``WORLD_SIZE``; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
