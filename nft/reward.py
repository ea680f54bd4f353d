"""Graders: is an answer right? ``grade(response, gold, grader="math_verify") -> bool``.

- ``math_verify`` (default): HuggingFace math-verify on the content of the answer's last ``\\boxed{}`` against
  ``\\boxed{gold}``; no box is wrong, and a plain-number gold needs a plain-number answer (see ``fast_verdict``).
- ``dapo``: strict, as the DAPO code: the last ``\\boxed{}`` in the final 300 characters, string match after
  normalisation (units, spaces, ``\\text{}``, ``\\left``/``\\right``, ``dfrac`` -> ``frac``, trailing ``.0``).

Never ``eval``: model output only ever reaches math-verify's parser. Time bounds: math-verify's own (signal based)
timeouts hold in a process's main thread only, and big-integer arithmetic in C cannot be interrupted at all, so
:class:`GraderPool` grades in worker processes and *kills* a worker that passes the hard bound; such an answer, and
any grader crash, counts as wrong and is recorded. Two exact shortcuts skip the pool: identical answer strings and
plain integer literals (where math-verify's verdict is the integer comparison).

Graders are the entries of :data:`GRADERS`; each :class:`Grader` says how it runs (its exact shortcut, whether it
needs a killable worker, whether it takes a timeout), so a new grader is one registry entry."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import util as mp_util
from multiprocessing.connection import wait as mp_wait
from typing import cast

MAX_ANSWER_CHARS = 2000  # longer text is cut to its tail before parsing
MAX_BOXED_CHARS = 300  # a boxed answer longer than this is wrong without parsing
_INT = re.compile(r"-?\d{1,60}")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if absent or unbalanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, min(len(text), i + 10 * MAX_BOXED_CHARS)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_LITERAL = re.compile(r"-?(\d+(\.\d+)?|\\[dt]?frac\{\d+\}\{\d+\})")
_ASSIGN = re.compile(r"^[a-zA-Z]\s*=\s*")


def _clean(s: str) -> str:
    return s.strip().strip("$").strip()


def is_literal(s: str) -> bool:
    """A plain number: integer, decimal or ``\\frac{a}{b}`` with an optional sign (spaces ignored)."""
    return bool(_LITERAL.fullmatch(_clean(s).replace(" ", "")))


def final_answer(response: str) -> str | None:
    """The answer a grader looks at: the content of the last ``\\boxed{}`` (``x = 5`` -> ``5``); None if absent."""
    boxed = extract_boxed(response[-MAX_ANSWER_CHARS:])
    return None if boxed is None else _ASSIGN.sub("", _clean(boxed))


def fast_verdict(response: str, gold: str) -> bool | None:
    """Exact decisions that need no parsing: True/False when decidable, None to defer to math-verify.

    An answer without ``\\boxed{}`` is wrong (the prompt asks for one; otherwise math-verify would evaluate
    whatever expression the text ends with -- a tiny policy learned within 30 steps to restate ``64 + 48`` unboxed
    and collect the reward). When the gold answer is a plain number the boxed answer must be one too: an
    unevaluated ``\\boxed{64 + 48}`` is not a final answer."""
    a = final_answer(response)
    if a is None:
        return False
    g = _clean(gold)
    if a == g:
        return True
    if len(a) > MAX_BOXED_CHARS:
        return False
    if is_literal(g) and not is_literal(a):
        return False
    if _INT.fullmatch(a) and _INT.fullmatch(g):
        return int(a) == int(g)
    return None


def grade_math_verify(response: str, gold: str, timeout: float = 2) -> bool:
    """math-verify's verdict (call in a process's main thread for its timeouts to work)."""
    from math_verify import parse, verify

    timeout = max(1, int(round(timeout)))  # math-verify's signal.alarm takes whole seconds
    fast = fast_verdict(response, gold)
    if fast is not None:
        return fast
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    if not gold_parsed:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    answer = parse(f"\\boxed{{{final_answer(response)}}}", parsing_timeout=timeout)
    if not gold_parsed or not answer:
        return False
    return bool(verify(gold_parsed, answer, timeout_seconds=timeout))


def grade_math_verify_official(response: str, gold: str) -> bool:
    """The official NFT code's grader for MATH500, Minerva and OlympiadBench (verl's ``math_verify.compute_score``,
    which ``verifier.py`` dispatches): math-verify's ``math_metric`` over the whole response, the answer extracted as
    an expression or as LaTeX (boxed or not: "The answer is 5" counts), the gold as LaTeX inside ``\\boxed{}``;
    right where the metric's score exceeds 0.5, wrong on any exception. Looser than ``math_verify``, which reads only
    the last box (units, ``^\\circ`` and an unboxed final answer are where they differ: ``tests/test_reward.py``)."""
    from math_verify.metric import math_metric
    from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

    metric = math_metric(
        gold_extraction_target=(LatexExtractionConfig(),),
        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
    )
    try:
        score, _ = metric([f"\\boxed{{{gold}}}"], [response])
    except Exception:  # noqa: BLE001 - the official call counts any failure as wrong
        return False
    return score > 0.5


_DAPO_REMOVE = ["\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$", " "]


def normalize_dapo(ans: str) -> str:
    """DAPO-style final-answer normalisation for the strict string match."""
    s = ans.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mbox|mathrm)\{\s*([^{}]*)\}", r"\1", s)
    for r in _DAPO_REMOVE:
        s = s.replace(r, "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"(degrees?|cm|meters?|units?|inches|inch|feet|dollars?)$", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    if re.fullmatch(r"-?[\d,]+", s) and "," in s and all(len(p) == 3 for p in s.lstrip("-").split(",")[1:]):
        s = s.replace(",", "")
    return s


def grade_dapo(response: str, gold: str) -> bool:
    """Strict DAPO grading: last ``\\boxed{}`` in the final 300 characters, normalised string match."""
    boxed = extract_boxed(response[-300:])
    return boxed is not None and normalize_dapo(boxed) == normalize_dapo(gold)


def grade_dapo_strict(response: str, gold: str) -> bool:
    """The official NFT code's strict grader for its ``*_dapo_boxed`` data sources (DAPO-Math-17k, AIME25, AMC23;
    verl's ``math_dapo.compute_score`` as ``verifier.py`` dispatches it), written from its behaviour: only the last
    100 characters of the response are read; the last literal ``\\boxed{`` there, its braces matched, gives the
    answer; right only if that answer equals the gold string exactly (no normalisation, no trimming). No box, an
    unclosed box or a box cut by the window: wrong."""
    tail = response[-100:]
    start = tail.rfind("\\boxed{")
    if start < 0:
        return False
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(tail)):
        depth += {"{": 1, "}": -1}.get(tail[j], 0)
        if depth == 0:
            return tail[i:j] == gold
    return False


@dataclass(frozen=True)
class Grader:
    """A registered grader: ``fn(response, gold) -> bool`` and how it must be run.

    Everything that differs between graders lives here, so :func:`grade` and :class:`GraderPool` never branch on a
    grader's name (registering an entry in :data:`GRADERS` is all a new grader needs)."""

    fn: Callable[[str, str], bool]
    fast: Callable[[str, str], bool | None] | None = None
    """exact decisions taken in the calling process before ``fn`` (None: defer to ``fn``); see :func:`fast_verdict`."""
    isolated: bool = True
    """``fn`` parses untrusted output and may not stop (signal-based timeouts, C big-integer arithmetic): the pool
    runs it in a worker process it can kill, and :func:`grade` counts any exception as wrong. False: ``fn`` is
    bounded string work, decided in the calling process (no worker is started)."""
    takes_timeout: bool = False
    """``fn`` accepts ``timeout=`` seconds, its own bound inside the worker (the pool's ``soft_timeout``)."""

    def in_process(self, response: str, gold: str) -> bool | None:
        """The verdict the calling process decides by itself: the whole grade of a bounded grader, the exact shortcut
        (or None, for the worker) of an isolated one."""
        if not self.isolated:
            return bool(self.fn(response, gold))
        return self.fast(response, gold) if self.fast is not None else None


GRADERS: dict[str, Grader] = {
    "math_verify": Grader(grade_math_verify, fast=fast_verdict, isolated=True, takes_timeout=True),
    "dapo": Grader(grade_dapo, isolated=False),
    "dapo_strict": Grader(grade_dapo_strict, isolated=False),
    "math_verify_official": Grader(grade_math_verify_official, isolated=True),
}


def get_grader(grader: str) -> Grader:
    """The registry entry named ``grader``; an unknown name is an error naming the known ones."""
    if grader not in GRADERS:
        raise ValueError(f"grader: unknown {grader!r}; known: {sorted(GRADERS)}")
    return GRADERS[grader]


def grade(response: str, gold: str, grader: str = "math_verify") -> bool:
    """Grade one answer in this process (main thread). For many answers or untrusted output use
    :class:`GraderPool`, which bounds the time per answer hard."""
    spec = get_grader(grader)
    verdict = spec.in_process(response, gold)
    if verdict is not None:
        return verdict
    try:  # only isolated graders get here: a crash is a wrong answer, as in the pool
        return bool(spec.fn(response, gold))
    except BaseException:  # math-verify's TimeoutException derives from BaseException
        return False


def _worker(conn, fn) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a job's SIGTERM (SLURM's, to every process) is the parent's
    try:  # warm up (imports math-verify / sympy) before saying ready: the per-answer clock starts after this
        fn("\\boxed{1}", "1")
    except BaseException:  # noqa: BLE001
        pass
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, response, gold = msg
        try:
            ok = fn(response, gold)
            conn.send((idx, bool(ok), None))
        except BaseException as e:  # noqa: BLE001 - any crash is a wrong answer, reported
            conn.send((idx, False, f"{type(e).__name__}: {str(e)[:200]}"))


@dataclass
class GradeStats:
    """A batch's grading: each failed answer counted once, in ``timeouts`` (killed) or ``errors`` (anything else)."""

    n: int = 0
    fast: int = 0
    timeouts: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class GraderPool:
    """Grades in ``workers`` processes with a hard per-answer bound ``hard_timeout`` (the worker is killed and
    replaced; the answer counts as wrong). Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        workers: int = 2,
        grader: str = "math_verify",
        hard_timeout: float = 5.0,
        soft_timeout: float = 2.0,
        fn=None,
    ):
        """``fn``: a picklable ``(response, gold) -> bool`` replacing the named grader (no fast path then)."""
        if fn is None:
            spec = get_grader(grader)
            fn = (
                functools.partial(cast("Callable[..., bool]", spec.fn), timeout=soft_timeout)
                if spec.takes_timeout
                else spec.fn
            )
        else:
            spec, grader = Grader(fn), "custom"
        if workers < 1:
            raise ValueError(f"grader workers: need >= 1, got {workers}")
        self.grader, self.spec, self.fn, self.hard_timeout = grader, spec, fn, hard_timeout
        self.startup_timeout = 60.0
        self._ctx = mp.get_context("spawn")
        self._procs: list = [None] * workers
        self._conns: list = [None] * workers
        self._ready: list[bool] = [False] * workers
        mp_util.Finalize(self, self.close, exitpriority=10)  # at exit, before multiprocessing SIGTERMs and joins them

    def _start(self, k: int) -> None:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_worker, args=(child, self.fn), daemon=True)
        p.start()
        child.close()
        self._procs[k], self._conns[k] = p, parent
        self._ready[k] = False

    def _wait_ready(self, ks: list[int], tries: int = 3) -> None:
        """Block until the given (new) workers have imported their grader (60 s at most each), starting again one
        that died first (a signal before its handler was set), ``tries`` times in all."""
        deadline = time.perf_counter() + self.startup_timeout
        for k in ks:
            for _ in range(tries):
                conn = self._conns[k]
                if conn.poll(max(0.0, deadline - time.perf_counter())):
                    try:
                        self._ready[k] = conn.recv() == "ready"
                    except (EOFError, OSError):  # died before it was ready
                        self._kill(k)
                        self._start(k)
                        continue
                break
            if not self._ready[k]:
                raise RuntimeError(f"grader worker {k} did not start within {self.startup_timeout:.0f} s")

    def _kill(self, k: int) -> None:
        p = self._procs[k]
        if p is not None:
            p.kill()
            p.join(timeout=5)
            self._conns[k].close()
        self._procs[k] = self._conns[k] = None

    def grade_many(
        self, responses: list[str], golds: list[str], only: list[bool] | None = None
    ) -> tuple[list[bool], GradeStats]:
        """Verdicts for all answers; where ``only[i]`` is False the answer is not graded (False), e.g. answers cut
        at the length limit, which count as wrong anyway."""
        if len(responses) != len(golds):
            raise ValueError(f"responses ({len(responses)}) and golds ({len(golds)}) differ in length")
        t0 = time.perf_counter()
        stats = GradeStats(n=len(responses))
        out: list[bool] = [False] * len(responses)
        todo = []
        for i, (r, g) in enumerate(zip(responses, golds)):
            if only is not None and not only[i]:
                continue
            fast = self.spec.in_process(r, g)
            if fast is None:
                todo.append(i)
            else:
                out[i] = fast
                stats.fast += 1
        queue = list(reversed(todo))
        busy: dict[int, tuple[int, float]] = {}  # worker -> (answer index, start time)
        while queue or busy:
            idle = [k for k in range(len(self._procs)) if k not in busy][: len(queue)]
            fresh = [k for k in idle if self._procs[k] is None or not self._procs[k].is_alive()]
            for k in fresh:
                self._start(k)
            self._wait_ready(fresh)
            for k in idle:
                if queue:
                    i = queue.pop()
                    self._conns[k].send((i, responses[i], golds[i]))
                    busy[k] = (i, time.perf_counter())
            ready = mp_wait([self._conns[k] for k in busy], timeout=0.05)
            for k in list(busy):
                conn = self._conns[k]
                i, started = busy[k]
                if conn in ready:
                    try:
                        idx, ok, err = conn.recv()
                    except (EOFError, OSError) as e:  # the worker died
                        ok, err = False, f"worker died: {e!r}"
                        self._kill(k)
                    out[i] = ok
                    if err:
                        stats.errors.append(err)
                    del busy[k]
                elif time.perf_counter() - started > self.hard_timeout:
                    self._kill(k)
                    out[i] = False
                    stats.timeouts += 1  # counted here only: errors are the other failures
                    del busy[k]
        stats.seconds = time.perf_counter() - t0
        return out, stats

    def close(self) -> None:
        for k, conn in enumerate(self._conns):
            if conn is not None:
                with contextlib.suppress(OSError):  # BrokenPipeError too
                    conn.send(None)
                self._procs[k].join(timeout=2)
                if self._procs[k].is_alive():
                    self._procs[k].kill()
        self._procs = [None] * len(self._procs)
        self._conns = [None] * len(self._conns)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
