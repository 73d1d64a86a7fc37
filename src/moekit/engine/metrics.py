"""Engine counters since start and token rates over a sliding window (default 10 s) of recent
steps, thread-safe; `Engine.metrics()` reads them for /metrics (server/metrics.py) and tests."""

from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Dict, Tuple


class EngineMetrics:
    """`record_step` is called by the engine thread alone, once a step, without a lock (the step's own counts live
    apart from `totals`, which `count` updates from any thread under the lock); readers copy the window of
    steps first (one C call: atomic under the GIL)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._steps: Deque[Tuple[float, int, int]] = collections.deque()  # (time, prompt tok, gen tok)
        self._step_counts = [0, 0, 0]  # steps, prompt tokens, generated tokens (engine thread)
        self.started = time.perf_counter()
        self.totals: Dict[str, int] = collections.Counter()

    def record_step(self, prompt_tokens: int, generated_tokens: int) -> None:
        now = time.perf_counter()
        steps, counts = self._steps, self._step_counts
        steps.append((now, prompt_tokens, generated_tokens))
        counts[0] += 1
        counts[1] += prompt_tokens
        counts[2] += generated_tokens
        while steps[0][0] < now - self.window_s:  # (the step just appended stays)
            steps.popleft()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.totals[name] += n

    def snapshot(self) -> Tuple[float, float, Dict[str, int]]:
        """(prompt tokens/s, generated tokens/s) over the window, and a copy of the totals."""
        now = time.perf_counter()
        recent = [s for s in list(self._steps) if s[0] >= now - self.window_s]
        with self._lock:
            totals = dict(self.totals)
        totals.update(zip(("steps", "prompt_tokens", "generation_tokens"), self._step_counts))
        span = min(self.window_s, now - self.started)
        if span <= 0:
            return 0.0, 0.0, totals
        return sum(s[1] for s in recent) / span, sum(s[2] for s in recent) / span, totals
