"""Engine counters since start and token rates over a sliding window (default 10 s) of recent
steps, thread-safe; `Engine.metrics()` reads them for /metrics (server/metrics.py) and tests."""

from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Dict, Tuple


class EngineMetrics:
    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._steps: Deque[Tuple[float, int, int]] = collections.deque()  # (time, prompt tok, gen tok)
        self.started = time.perf_counter()
        self.totals: Dict[str, int] = collections.Counter()

    def record_step(self, prompt_tokens: int, generated_tokens: int) -> None:
        now = time.perf_counter()
        with self._lock:
            self._steps.append((now, prompt_tokens, generated_tokens))
            self.totals["steps"] += 1
            self.totals["prompt_tokens"] += prompt_tokens
            self.totals["generation_tokens"] += generated_tokens
            self._trim(now)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.totals[name] += n

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()

    def snapshot(self) -> Tuple[float, float, Dict[str, int]]:
        """(prompt tokens/s, generated tokens/s) over the window, and a copy of the totals."""
        now = time.perf_counter()
        with self._lock:
            self._trim(now)
            span = min(self.window_s, now - self.started)
            if span <= 0:
                return 0.0, 0.0, dict(self.totals)
            return sum(s[1] for s in self._steps) / span, sum(s[2] for s in self._steps) / span, dict(self.totals)
