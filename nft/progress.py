"""Progress as plain lines (no carriage returns), so that it reads well inside ``dvc repro``'s output and in logs:
one line every few steps with the caller's figures, the time per step and the time left."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """``update(step, **figures)`` prints ``label: step 10/30 | reward 0.41 | 0.52 s/step | ETA 0:00:10`` every
    ``every`` steps (default: about ten lines per run) and at the last step."""

    def __init__(self, label: str, total: int, start: int = 0, every: int | None = None, enabled: bool = True):
        self.label, self.total, self.start, self.enabled = label, total, start, enabled
        self.every = every or max(1, (total - start) // 10)
        self.t0 = time.perf_counter()

    def update(self, step: int, **figures) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        per = (time.perf_counter() - self.t0) / max(step - self.start, 1)
        cells = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
        print(
            " | ".join(
                [
                    f"{self.label}: step {step}/{self.total}",
                    *cells,
                    f"{per:.2f} s/step",
                    f"ETA {_clock(per * (self.total - step))}",
                ]
            ),
            file=sys.stdout,
            flush=True,
        )
