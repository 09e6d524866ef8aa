"""Wall time of each stage of one rewrite (analyses, passes, derived-input packing), for the report.

``StageTimer.stage(name)`` times a block; ``StageTimer.add(name, s)`` accumulates time measured
elsewhere (e.g. the packing inside a pass). ``seconds`` keeps the stages in the order they ran.
"""
from __future__ import annotations

import time
from contextlib import contextmanager


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self, digits: int = 3) -> dict[str, float]:
        return {k: round(v, digits) for k, v in self.seconds.items()}

    def line(self) -> str:
        """``match_linears 0.01 s, ..., total 1.2 s`` (what the INFO log line shows)."""
        parts = [f"{k} {v:.2f} s" for k, v in self.seconds.items()]
        return ", ".join(parts)
