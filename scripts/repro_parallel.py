"""``dvc repro`` with independent stages run side by side (DVC itself runs one stage at a time).

Usage (``make study`` runs this)::

    python scripts/repro_parallel.py --jobs 2 --first evaluate-base --chain train evaluate

1. ``dvc repro FIRST``: everything the parallel stages share (prepare, base, ...), one stage at a time;
2. one job per key of the matrix stage ``CHAIN[0]`` (``train@nft-0``, ...): ``dvc repro --single-item`` of each
   chain stage with that key in turn (``train@nft-0`` then ``evaluate@nft-0``), ``--jobs`` jobs at a time. DVC
   supports several ``dvc repro`` processes on disjoint stages (dvc.org, ``dvc repro``, "Parallel stage
   execution"); ``--single-item`` keeps each process off the shared upstream stages, whose outputs the other jobs
   read (without it, a process re-checking a shared stage failed with "... is busy"). A process that finds the repository
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

LOCK_MARKERS = ("Unable to acquire lock", "LockError")


def dvc(args: list[str], log: Path | None = None, retries: int = 20) -> int:
    """Run ``dvc ARGS`` (output to ``log`` if given); with a log, retry while it fails only because another dvc
    process holds the repository lock."""
    if log is None:
        return subprocess.call(["dvc", *args])
    for attempt in range(retries + 1):
        with open(log, "w") as fh:
            rc = subprocess.call(["dvc", *args], stdout=fh, stderr=subprocess.STDOUT)
        if rc == 0 or not any(m in log.read_text(errors="replace") for m in LOCK_MARKERS):
            return rc
        time.sleep(0.5 + 0.25 * attempt)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="stages at once (default 2)")
    p.add_argument("--first", action="append", default=[], help="stage(s) reproduced before the parallel ones")
    p.add_argument(
        "--chain", nargs="+", required=True, help="matrix stages run in this order for each key, e.g. train evaluate"
    )
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs: must be >= 1")
    t0 = time.perf_counter()
    if args.first and dvc(["repro", *args.first]) != 0:
        return 1
    names = subprocess.run(
        ["dvc", "stage", "list", "--name-only"], check=True, capture_output=True, text=True
    ).stdout.split()
    head = args.chain[0]
    keys = [s.split("@", 1)[1] for s in names if fnmatch.fnmatchcase(s, f"{head}@*")]
    if not keys:
        print(f"repro_parallel: no matrix stage {head!r} in dvc.yaml", file=sys.stderr)
        return 2
    jobs = {k: [f"{c}@{k}" for c in args.chain] for k in keys}
    missing = [s for chain in jobs.values() for s in chain if s not in names]
    if missing:
        print(f"repro_parallel: --chain: stage(s) {missing[:4]} not in dvc.yaml", file=sys.stderr)
        return 2
    print(f"repro_parallel: {len(keys)} jobs ({' -> '.join(args.chain)}), {args.jobs} at a time", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="repro_parallel_") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_timed, jobs[k], Path(tmp) / (k.replace("/", "_") + ".log")): k for k in keys}
        for done, fut in enumerate(as_completed(futures), 1):
            if fut.cancelled():
                continue
            key = futures[fut]
            rc, seconds, log = fut.result()
            print(
                f"repro_parallel: [{done}/{len(keys)}] {' -> '.join(jobs[key])} "
                f"{'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.1f} s",
                flush=True,
            )
            if rc != 0:
                failed.append(key)
                sys.stdout.write(log[-4000:])
                for other in futures:  # the queue stops; jobs already started finish
                    other.cancel()
    if failed:
        print(f"repro_parallel: failed: {failed}", file=sys.stderr)
        return 1
    rc = dvc(["repro"])
    print(f"repro_parallel: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return rc


def _timed(stages: list[str], log: Path) -> tuple[int, float, str]:
    """``dvc repro --single-item`` of each stage in turn, stopping at a failure: exit status, seconds, the logs."""
    t, rc, text = time.perf_counter(), 0, ""
    for stage in stages:
        rc = dvc(["repro", "--single-item", stage], log=log)
        text += log.read_text(errors="replace")
        if rc != 0:
            break
    return rc, time.perf_counter() - t, text


if __name__ == "__main__":
    sys.exit(main())
