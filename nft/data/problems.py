"""A problem and a set of problems: what every loader returns (a leaf module: the registry and the hub loader both
build them)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class Item:
    """One problem: ``id``, ``question``, ``answer`` (LaTeX, normalised), plus the source row's extras."""

    id: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict)


class ProblemSet(list):
    """A list of problems with a ``name``, a content ``hash`` and the count of ``skipped`` rows (no answer)."""

    def __init__(self, items, name: str, skipped: int = 0):
        super().__init__(items)
        self.name, self.skipped = name, skipped
        h = hashlib.sha256()
        for p in items:
            h.update(f"{p.question}\x00{p.answer}\x01".encode())
        self.hash = h.hexdigest()[:16]
