"""``dvc repro`` with independent stages run side by side (DVC itself runs one stage at a time).

Usage (``make study`` runs this)::

    python scripts/repro_parallel.py --jobs 2 --first evaluate-base --chain train evaluate

1. ``dvc repro FIRST``: everything the parallel stages share (prepare, base, ...), one stage at a time;
2. one job per key of the matrix stage ``CHAIN[0]`` (``train@nft-0``, ...): ``dvc repro --single-item`` of each
   chain stage with that key in turn (``train@nft-0`` then ``evaluate@nft-0``), ``--jobs`` jobs at a time. DVC
   supports several ``dvc repro`` processes on disjoint stages (dvc.org, ``dvc repro``, "Parallel stage
   execution"); ``--single-item`` keeps each process off the shared upstream stages, whose outputs the other jobs
   read (without it, re-checking ``base`` failed with "models/base is busy"). A process that finds the repository
   lock taken is retried;
3. ``dvc repro``: the rest (analysis), and a check that nothing is left out of date.

Results do not depend on ``--jobs``: each stage's command is the one in dvc.yaml, and the study runs its training and
evaluation with one CPU thread per process (``train.threads``, ``eval.threads``), whose results are bit-identical
from run to run; ``--jobs`` only decides how many of them share the machine at once. A failed stage stops the
queue (stages already started finish) and the exit status is non-zero; its log is printed.
"""

from __future__ import annotations

import argparse
import fnmatch
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

LOCK_MARKERS = ("Unable to acquire lock", "LockError")


def dvc(args: list[str], log: Path | None = None, retries: int = 20) -> int:
    """Run ``dvc ARGS``; retry while it fails only because another dvc process holds the repository lock."""
    for attempt in range(retries + 1):
        if log is None:
            rc = subprocess.call(["dvc", *args])
            return rc
        with open(log, "w") as fh:
            rc = subprocess.call(["dvc", *args], stdout=fh, stderr=subprocess.STDOUT)
        if rc == 0 or not any(m in log.read_text(errors="replace") for m in LOCK_MARKERS) or attempt == retries:
            return rc
        time.sleep(0.5 + 0.25 * attempt)
    return rc


def stage_names(pattern: str) -> list[str]:
    out = subprocess.run(["dvc", "stage", "list", "--name-only"], check=True, capture_output=True, text=True).stdout
    return [s for s in out.split() if fnmatch.fnmatchcase(s, pattern)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="stages at once (default 2)")
    p.add_argument("--first", action="append", default=[], help="stage(s) reproduced before the parallel ones")
    p.add_argument("--chain", nargs="+", required=True,
                   help="matrix stages run in this order for each key, e.g. train evaluate")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs: must be >= 1")
    t0 = time.perf_counter()
    if args.first and dvc(["repro", *args.first]) != 0:
        return 1
    names = set(stage_names("*"))
    head = args.chain[0]
    keys = [s.split("@", 1)[1] for s in stage_names(f"{head}@*")]
    if not keys:
        print(f"repro_parallel: no matrix stage {head!r} in dvc.yaml", file=sys.stderr)
        return 2
    jobs = {k: [f"{c}@{k}" for c in args.chain] for k in keys}
    missing = [s for chain in jobs.values() for s in chain if s not in names]
    if missing:
        print(f"repro_parallel: --chain: stage(s) {missing[:4]} not in dvc.yaml", file=sys.stderr)
        return 2
    targets = list(keys)
    print(f"repro_parallel: {len(targets)} jobs ({' -> '.join(args.chain)}), {args.jobs} at a time", flush=True)
    failed: list[tuple[str, Path]] = []
    with tempfile.TemporaryDirectory(prefix="repro_parallel_") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        queue = list(targets)
        running = {}
        done = 0

        def start(key: str):
            log = Path(tmp) / (key.replace("/", "_") + ".log")
            running[pool.submit(_timed, jobs[key], log)] = (key, log)

        while queue and len(running) < args.jobs:
            start(queue.pop(0))
        while running:
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                key, log = running.pop(fut)
                rc, seconds = fut.result()
                done += 1
                print(f"repro_parallel: [{done}/{len(targets)}] {' -> '.join(jobs[key])} "
                      f"{'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.1f} s", flush=True)
                if rc != 0:
                    failed.append((key, log))
                    sys.stdout.write(log.read_text(errors="replace")[-4000:])
                    queue.clear()
                elif queue:
                    start(queue.pop(0))
    if failed:
        print(f"repro_parallel: failed: {[k for k, _ in failed]}", file=sys.stderr)
        return 1
    rc = dvc(["repro"])
    print(f"repro_parallel: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return rc


def _timed(stages: list[str], log: Path) -> tuple[int, float]:
    t = time.perf_counter()
    rc = 0
    for i, stage in enumerate(stages):
        part = log.with_suffix(f".{i}.log")
        rc = dvc(["repro", "--single-item", stage], log=part)
        with open(log, "a") as fh:
            fh.write(part.read_text(errors="replace"))
        if rc != 0:
            break
    return rc, time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
