"""Benchmark: graded answers per second on 5,000 MATH500-style answers with the worker pool.

    python benchmarks/grading.py [--n 5000] [--workers 2]

Answers are built from MATH500's gold answers (``../shared/benchmarks`` or $NFT_BENCHMARKS_DIR): a third verbatim
(decided by the exact fast path), a third reformatted (``\\dfrac``, spaces, a trailing sentence: math-verify parses
them), a third another problem's answer (wrong, parsed). Prints the rate per kind and overall.
"""

from __future__ import annotations

import argparse
import random
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from nft.data.hub import load_local
    from nft.reward import GraderPool

    golds = [p.answer for p in load_local("math500")]
    rng = random.Random(0)
    kinds = {"verbatim": [], "reformatted": [], "wrong": []}
    for i in range(args.n):
        g = rng.choice(golds)
        kind = ("verbatim", "reformatted", "wrong")[i % 3]
        if kind == "verbatim":
            text = f"Step by step ... so the answer is \\boxed{{{g}}}."
        elif kind == "reformatted":
            alt = g.replace("\\frac", "\\dfrac")
            text = f"We find that the result is \\boxed{{ {alt} }}. Done."
        else:
            text = f"Hence \\boxed{{{rng.choice(golds)}}}."
        kinds[kind].append((text, g))
    with GraderPool(args.workers) as pool:
        pool.grade_many(["\\boxed{1}"], ["2"])  # start the workers before timing
        total_t, total_n = 0.0, 0
        for kind, items in kinds.items():
            t0 = time.perf_counter()
            verdicts, stats = pool.grade_many([t for t, _ in items], [g for _, g in items])
            dt = time.perf_counter() - t0
            total_t, total_n = total_t + dt, total_n + len(items)
            print(
                f"{kind:12s} {len(items):5d} answers  {dt:6.2f} s  {len(items) / dt:8.0f} answers/s  "
                f"right {sum(verdicts) / len(items):.3f}  fast path {stats.fast / len(items):.2f}  "
                f"timeouts {stats.timeouts}"
            )
    print(
        f"{'all':12s} {total_n:5d} answers  {total_t:6.2f} s  {total_n / total_t:8.0f} answers/s "
        f"({args.workers} worker processes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
