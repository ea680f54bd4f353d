"""Graders: correctness on known cases, hard time bounds on adversarial answers, crashes counted as wrong."""

import subprocess
import sys
import time

import pytest

from nft.reward import GraderPool, extract_boxed, fast_verdict, grade, grade_dapo, normalize_dapo
from tests.conftest import REPO

ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{" + "{" * 10000 + "1" + "}" * 10000 + "}",
    "x" * 100_000 + "\\boxed{3}",
    "\\boxed{" + "1+" * 50_000 + "1}",
    "\\boxed{\u202e\u0000\ud7ff\U0001f600 ∑∫√ \ufeff}",
    "\\boxed{(" * 3000 + ")}" * 3000,
    "\\boxed{\\frac{\\frac{\\frac{1}{2}}{3}}{" + "\\sqrt{" * 500 + "2" + "}" * 500 + "}}",
    "\\boxed{10^{10^{10^{10^{10}}}} - 10^{10^{10^{10^{10}}}}}",
]


@pytest.mark.parametrize(
    "response,gold,ok",
    [
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True),
        ("so \\boxed{0.5}", "\\frac{1}{2}", True),
        ("so \\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}", True),
        ("so \\boxed{-3}", "-3", True),
        ("so \\boxed{3}", "-3", False),
        ("no box but the answer is $42$", "42", False),  # the prompt asks for \boxed{}; unboxed text is not graded
        ("What is 64 + 48?\n64 + 48", "112", False),  # reward hacking seen in training: restate the question
        ("\\boxed{64 + 48}", "112", False),  # an unevaluated expression is not a final number
        ("\\boxed{112}", "112", True),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
        ("\\boxed{\\frac{3^{1/2}}{2}}", "\\frac{\\sqrt{3}}{2}", True),  # symbolic gold: math-verify decides
        ("\\boxed{x = 5}", "5", True),
        ("\\boxed{27}", "27", True),
        ("", "1", False),
    ],
)
def test_math_verify_cases(response, gold, ok):
    assert grade(response, gold) is ok


def test_fast_path_agrees_with_math_verify():
    from nft.reward import grade_math_verify

    for resp, gold in [
        ("\\boxed{12}", "12"),
        ("\\boxed{13}", "12"),
        ("\\boxed{-0}", "0"),
        ("\\boxed{007}", "7"),
        ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ]:
        fast = fast_verdict(resp, gold)
        assert fast is not None and fast == grade_math_verify(resp, gold)


def test_extract_boxed():
    assert extract_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed("nothing") is None


def test_dapo_grader():
    assert grade_dapo("... \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}")
    assert grade_dapo("\\boxed{27.0}", "27")
    assert grade_dapo("\\boxed{30^\\circ}", "30")
    assert not grade_dapo("\\boxed{0.5}", "\\frac{1}{2}")  # strict: no numeric equivalence
    assert not grade_dapo("\\boxed{1}" + " " * 400, "1")  # the box must be in the last 300 characters
    assert normalize_dapo("\\text{ 5 }") == "5"


def test_pool_bounds_time_and_survives_adversarial_answers():
    golds = ["3"] * len(ADVERSARIAL)
    with GraderPool(workers=2, hard_timeout=5.0) as pool:
        t0 = time.perf_counter()
        verdicts, stats = pool.grade_many(ADVERSARIAL, golds)
        elapsed = time.perf_counter() - t0
        assert len(verdicts) == len(ADVERSARIAL)
        assert verdicts[2] is True  # a long preamble does not hide the boxed answer
        assert not any(verdicts[i] for i in (0, 1, 3, 4, 5, 6, 7))
        # each answer within 5 s: 8 answers on 2 workers can take at most 4 rounds of the bound (+ respawns)
        assert elapsed < 4 * 5.0 + 10
        # the pool still works after killing workers
        ok, _ = pool.grade_many(["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"], ["\\frac{1}{2}", "\\frac{1}{2}"])
        assert ok == [True, True]


def hanging_or_crashing_grader(response: str, gold: str) -> bool:
    """A grader stuck in C code (no signal can stop it) or crashing, to prove the pool's bound."""
    if "hang" in response:
        time.sleep(3600)
    if "crash" in response:
        raise RuntimeError("grader crashed")
    return response == gold


def test_pool_kills_a_hanging_worker():
    with GraderPool(workers=1, hard_timeout=1.0, fn=hanging_or_crashing_grader) as pool:
        t0 = time.perf_counter()
        verdicts, stats = pool.grade_many(["hang", "ok", "crash", "ok"], ["x", "ok", "x", "no"])
        assert time.perf_counter() - t0 < 10
    assert verdicts == [False, True, False, False]
    # the killed worker is a timeout, counted once; errors are the other failures (the crash)
    assert stats.timeouts == 1
    assert len(stats.errors) == 1 and "RuntimeError" in stats.errors[0]


def grade_by_length(response: str, gold: str) -> bool:
    """A made-up grader for the registry tests (module level: the pool's spawned workers import it)."""
    return len(response) == int(gold)


def test_registered_grader_is_used_by_grade_and_the_pool(monkeypatch):
    from nft.reward import GRADERS, Grader

    monkeypatch.setitem(GRADERS, "length", Grader(grade_by_length))
    # none of math_verify's shortcuts or dapo's match: "\\boxed{3}" has 9 characters
    assert grade("abc", "3", grader="length") is True
    assert grade("\\boxed{3}", "3", grader="length") is False
    with GraderPool(workers=1, grader="length") as pool:
        verdicts, stats = pool.grade_many(["abc", "\\boxed{3}", "\\boxed{3}"], ["3", "3", "9"])
    assert verdicts == [True, False, True] and stats.fast == 0  # isolated: graded in the worker


def test_registry_says_where_a_grader_runs(monkeypatch):
    from nft.reward import GRADERS, Grader

    calls = []

    def in_process(response: str, gold: str) -> bool:  # a closure: it could not reach a spawned worker
        calls.append(response)
        return response == gold

    monkeypatch.setitem(GRADERS, "same", Grader(in_process, isolated=False))
    with GraderPool(workers=1, grader="same") as pool:
        verdicts, stats = pool.grade_many(["a", "b"], ["a", "a"])
        assert pool._procs == [None]  # no worker was started
    assert verdicts == [True, False] and stats.fast == 2 and calls == ["a", "b"]
    assert grade("a", "a", grader="same") and calls[-1] == "a"
    # the shipped entries: math-verify parses untrusted text in a killable worker, dapo is string work in-process
    assert GRADERS["math_verify"].isolated and GRADERS["math_verify"].fast is fast_verdict
    assert not GRADERS["dapo"].isolated and GRADERS["dapo"].fn is grade_dapo


def test_pool_workers_outlive_a_sigterm_sent_to_the_whole_job():
    """SLURM sends SIGTERM to every process of a job step: the run finishes its step and checkpoints, so its grader
    workers must keep grading (a killed worker would turn a right answer wrong, and the resumed run would differ)."""
    import os
    import signal

    with GraderPool(workers=1, hard_timeout=5.0, fn=hanging_or_crashing_grader) as pool:
        assert pool.grade_many(["ok"], ["ok"])[0] == [True]  # started and ready
        pid = pool._procs[0].pid
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        verdicts, stats = pool.grade_many(["ok", "ok"], ["ok", "no"])
        assert verdicts == [True, False] and not stats.errors and pool._procs[0].pid == pid


def test_pool_starts_again_a_worker_that_died_while_starting(monkeypatch):
    """A worker killed before it is ready (a signal during its start-up) is started again, not a failed run."""
    with GraderPool(workers=1, hard_timeout=5.0, fn=hanging_or_crashing_grader) as pool:
        real, starts = pool._start, []

        def start_then_kill_the_first(k):
            real(k)
            starts.append(pool._procs[k].pid)
            if len(starts) == 1:
                pool._procs[k].kill()

        monkeypatch.setattr(pool, "_start", start_then_kill_the_first)
        verdicts, stats = pool.grade_many(["ok"], ["ok"])
        assert verdicts == [True] and not stats.errors and len(starts) == 2


def test_a_process_left_with_an_open_pool_exits():
    """Workers ignore SIGTERM, which is how multiprocessing stops daemon processes at exit: the pool closes them
    first, so a run that ends without closing its pool (an error) still exits."""
    code = (
        "from nft.reward import GraderPool\n"
        "from tests.test_reward import hanging_or_crashing_grader as g\n"
        "p = GraderPool(workers=1, fn=g)\n"
        "print(p.grade_many(['ok'], ['no'])[0])\n"  # graded by a worker (equal strings take the shortcut)
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "[False]", r.stderr
