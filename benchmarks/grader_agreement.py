"""Grader agreement on the paper's six benchmarks: how often each registered grader calls an answer right, on three
answer sets built from the benchmark's gold answers, and how often two graders disagree.

    python benchmarks/grader_agreement.py [--workers 2]

Answer sets (per problem, one answer each; ``../shared/benchmarks`` or $NFT_BENCHMARKS_DIR):
- ``gold``: the gold answer boxed at the end of a sentence (every grader should say right);
- ``shuffled``: another problem's gold answer, boxed (should be wrong, except coincidences);
- ``format``: the gold answer in another format: ``\\dfrac`` for ``\\frac``, spaces inside the box, a trailing
  sentence after it (a lenient grader says right, the official strict one says wrong).
Prints a Markdown table: benchmark, answer set, each grader's "right" rate, and the disagreement rate of each pair.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys


def answer_sets(golds: list[str], seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    shuffled = golds[:]
    rng.shuffle(shuffled)
    tail = " This completes the solution, as required by the problem statement above."
    return {
        "gold": [f"Step by step, the answer is \\boxed{{{g}}}." for g in golds],
        "shuffled": [f"Step by step, the answer is \\boxed{{{s}}}." for s in shuffled],
        "format": [f"So we get \\boxed{{ {g.replace(chr(92) + 'frac', chr(92) + 'dfrac')} }}.{tail}" for g in golds],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from nft.data.hub import load_local
    from nft.reward import GRADERS, GraderPool

    graders = sorted(GRADERS)
    pairs = list(itertools.combinations(graders, 2))
    print(
        "| benchmark | answers | n | "
        + " | ".join(f"{g} right" for g in graders)
        + " | "
        + " | ".join(f"{a} vs {b} disagree" for a, b in pairs)
        + " |"
    )
    print("|---" * (3 + len(graders) + len(pairs)) + "|")
    pools = {g: GraderPool(args.workers, g) for g in graders}
    try:
        for bench in ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"):
            golds = [p.answer for p in load_local(bench)]
            for kind, answers in answer_sets(golds).items():
                verdicts = {g: pools[g].grade_many(answers, golds)[0] for g in graders}
                n = len(golds)
                right = [f"{100 * sum(verdicts[g]) / n:.1f}%" for g in graders]
                dis = [f"{100 * sum(x != y for x, y in zip(verdicts[a], verdicts[b])) / n:.1f}%" for a, b in pairs]
                print(f"| {bench} | {kind} | {n} | " + " | ".join(right) + " | " + " | ".join(dis) + " |", flush=True)
    finally:
        for p in pools.values():
            p.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
