"""The process group as the loop and the samplers see it: rank, world size and a few collectives (trivial in a single
process). Shared by ``nft.train`` and ``nft.rollout`` (a vLLM engine spanning several processes)."""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
from typing import Any


class Dist:
    """Rank, world size and the few collectives the loop needs; trivial in a single process.

    ``Dist.bytes_received`` counts the pickled bytes this process received from other ranks through these
    collectives (all instances together), so the loop can log what a step moved."""

    bytes_received = 0

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
        self._td.all_gather_object(out, pickle.dumps(obj))  # pickled here, so the bytes can be counted
        Dist.bytes_received += sum(len(b) for r, b in enumerate(out) if r != self.rank)
        return [pickle.loads(b) for b in out]

    def exchange(self, send: list[Any]) -> list[Any]:
        """All-to-all: ``send[r]`` goes to rank ``r`` only; returns what each rank sent to this one, in rank order
        (one scatter per source rank: nothing is broadcast to ranks it is not meant for)."""
        if self.world == 1:
            return [send[0]]
        got: list[Any] = []
        for src in range(self.world):
            box: list[Any] = [None]
            # this rank's own share is not sent (an empty placeholder keeps the scatter's shape)
            blobs = (
                [b"" if r == self.rank else pickle.dumps(x) for r, x in enumerate(send)] if src == self.rank else None
            )
            self._td.scatter_object_list(box, blobs, src=src)
            if src == self.rank:
                got.append(send[self.rank])
            else:
                Dist.bytes_received += len(box[0])
                got.append(pickle.loads(box[0]))
        return got

    def sum(self, x: float) -> float:
        return float(sum(self.gather(x))) if self.world > 1 else x

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box: list[Any] = [pickle.dumps(obj) if self.rank == 0 else None]
        self._td.broadcast_object_list(box, src=0)
        if self.rank != 0:
            Dist.bytes_received += len(box[0])
        return pickle.loads(box[0])


def leave() -> None:
    """Leave the launcher's process group after a command succeeded (every rank at once): a process that exits
    with the group still open can abort in its teardown ("terminate called without an active exception"). A single
    process leaves alone a group that a library opened for itself (vLLM's in-process engine: its shutdown destroys
    it)."""
    import torch.distributed as td

    if launched_world_size() > 1 and td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()
        # DeepSpeed's CPU collectives leave a 66 MB shared-memory buffer per process behind (named by the master's
        # address and port and the local rank); each process removes its own (its mapping lives until it exits)
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if addr and port:
            rank = os.environ.get("LOCAL_RANK", "0")
            for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
                with contextlib.suppress(OSError):
                    os.unlink(f)


def launched_world_size() -> int:
    """Processes started by the launcher (``WORLD_SIZE``; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))
