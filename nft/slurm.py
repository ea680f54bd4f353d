"""A train (or evaluate) stage as a SLURM job: DVC runs ``python -m nft.submit train --config params.yaml ...`` on the submitting
node (``study.launcher: python -m nft.submit``); this submits one batch job with ``study.slurm``'s resources, whose
script runs ``srun python -m nft.cli train ...`` (one task per GPU, spanning the job's nodes: nft.dist.adopt_slurm),
waits for it (``sbatch --wait``) and exits with its status, so DVC keeps the lock, the hashes and the lineage.

A job that SLURM preempts or times out gets SIGTERM first; ``nft train`` then checkpoints and exits 143
(nft.dist.PREEMPTED_EXIT), and the job is submitted again (up to ``study.slurm.resubmits`` times) and resumes from
that checkpoint. A job that fails otherwise ends the stage with one line: the job id, its log and the last error.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from .config import SlurmSection


def batch_script(s: SlurmSection, name: str, argv: list[str], python: str = sys.executable) -> str:
    """The job's batch script: its resources as ``#SBATCH`` lines, then ``srun`` of ``nft`` with ``argv``."""
    opts = [
        f"--job-name={name}",
        f"--nodes={s.nodes}",
        f"--ntasks-per-node={s.tasks}",
        f"--cpus-per-task={s.cpus_per_task}",
        f"--output={Path(s.logs).resolve()}/{name}-%j.out",
        "--no-requeue",  # the submitter resubmits (on exit 143): a job requeued by SLURM as well would run twice
    ]
    opts += [f"--gpus-per-node={s.gpus_per_node}"] if s.gpus_per_node else []
    opts += [f"--time={s.time}"] if s.time else []
    opts += [f"--partition={s.partition}"] if s.partition else []
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts + list(s.sbatch))]
    lines += [f"cd {shlex.quote(str(Path.cwd()))}", f"exec srun {shlex.join([python, '-m', 'nft.cli', *argv])}", ""]
    return "\n".join(lines)


def _stage_name(argv: list[str]) -> str:
    out = argv[argv.index("--out") + 1] if "--out" in argv else "run"
    return f"nft-{argv[0]}-{Path(out).name.removesuffix('.json')}"


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    own = [ln for ln in lines if not ln.startswith(("srun:", "slurmstepd"))]  # SLURM's own lines say only "failed"
    errors = [ln for ln in own if "error" in ln.lower()] or [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["(empty log)"])[-1][:300]


def submit(s: SlurmSection, argv: list[str]) -> int:
    """Submit ``nft ARGV`` as a job, wait, resubmit while it stops after a checkpoint; the job's exit status."""
    from .dist import PREEMPTED_EXIT

    if argv[0] == "evaluate":  # one process per node's GPUs: vLLM's tensor parallelism, or the torch sampler
        s = dataclasses.replace(s, nodes=1, tasks_per_node=1)
    name = _stage_name(argv)
    Path(s.logs).mkdir(parents=True, exist_ok=True)
    script = batch_script(s, name, argv)
    for attempt in range(s.resubmits + 1):
        r = subprocess.run(
            ["sbatch", "--parsable", "--wait"], input=script, capture_output=True, text=True, check=False
        )
        job = r.stdout.strip().split(";")[0] or "?"
        log = Path(s.logs) / f"{name}-{job}.out"
        if r.returncode == 0:
            print(f"nft slurm: {name}: job {job} done (log {log})", flush=True)
            return 0
        if r.returncode != PREEMPTED_EXIT or attempt == s.resubmits:
            why = last_error(log) if log.is_file() else (r.stderr.strip().splitlines() or ["sbatch failed"])[-1]
            print(
                f"nft slurm: {name}: job {job} failed (exit {r.returncode}); log {log}; last error: {why}",
                file=sys.stderr,
                flush=True,
            )
            return r.returncode or 1
        print(
            f"nft slurm: {name}: job {job} stopped after its checkpoint; submitting again "
            f"({attempt + 1} of {s.resubmits})",
            flush=True,
        )
    return 1
