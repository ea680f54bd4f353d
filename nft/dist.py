"""The process group as the loop and the samplers see it: rank, world size and a few collectives (trivial in a single
process). Shared by ``nft.train`` and ``nft.rollout`` (a vLLM engine spanning several processes)."""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
from collections.abc import MutableMapping
from typing import Any

#: the exit status of a run stopped by SIGTERM/SIGUSR1 after its checkpoint (128 + SIGTERM, as a shell reports it)
PREEMPTED_EXIT = 143


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


def adopt_slurm(env: MutableMapping[str, str] | None = None) -> bool:
    """Under ``srun`` (a job step of several tasks) and no launcher's variables: set the ones ``torch.distributed``
    and DeepSpeed read (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``LOCAL_SIZE``,
    ``MASTER_ADDR``: the step's first node, ``MASTER_PORT``: from the job and step ids unless set) from SLURM's, so
    that ``srun -N 2 --ntasks-per-node 8 nft train ...`` spans its nodes without ssh or a launcher. True if set."""
    if env is None:
        env = os.environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if "WORLD_SIZE" in env or tasks < 2:
        return False
    per_node = _expand_counts(env["SLURM_STEP_TASKS_PER_NODE"])
    local = str(per_node[int(env.get("SLURM_NODEID", "0"))])
    env.update(
        RANK=env["SLURM_PROCID"],
        WORLD_SIZE=str(tasks),
        LOCAL_RANK=env["SLURM_LOCALID"],
        LOCAL_WORLD_SIZE=local,
        LOCAL_SIZE=local,
        MASTER_ADDR=_first_host(env["SLURM_STEP_NODELIST"]),
    )
    if "MASTER_PORT" not in env:  # a port per job step, so that steps sharing a node do not collide
        env["MASTER_PORT"] = str(
            20000 + (int(env.get("SLURM_JOB_ID", "0")) * 31 + int(env.get("SLURM_STEP_ID", "0"))) % 20000
        )
    return True


def _expand_counts(spec: str) -> list[int]:
    """SLURM's tasks per node, ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        out += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return out


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` expands ranges such as ``gpu[01-04]``)."""
    import shutil
    import subprocess

    if "[" not in nodelist or not shutil.which("scontrol"):
        return nodelist.split(",")[0]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]
