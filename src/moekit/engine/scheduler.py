"""Continuous-batching scheduler: the waiting queue, admission against the KV budget, and
which requests feed tokens each step (docs/architecture.md, "The engine's two forwards").

Admission is strictly first come first served: the oldest waiting request is admitted while
fewer than `max_batch` run and the KV budget has room for prompt + max_tokens; when it does
not fit, everything behind it waits too (a large request is not starved by small ones).
Each step, every request past its prompt decodes one token, and requests in their prompt
feed their next chunk, oldest first, within `max_step_tokens` rows (at least one chunk).
Chunk boundaries are multiples of `prefill_chunk` from the prompt start, never load-dependent.
"""

from __future__ import annotations

import collections
import time
from typing import Deque, List, Optional

from ..plan import Segment
from .kv import KVBudget
from .params import SamplingParams
from .text import TextStream


class Sequence:
    """One request (one choice) inside the engine."""

    def __init__(self, seq_id: int, prompt: List[int], params: SamplingParams, stops, generator,
                 text: Optional[TextStream], handle):
        self.id, self.prompt, self.params, self.stops = seq_id, prompt, params, stops
        self.generator, self.text, self.handle = generator, text, handle
        self.out: List[int] = []
        self.logprobs: List[float] = []
        self.top_logprobs: List[list] = []
        self.row: Optional[int] = None  # its row of the KV pool while admitted
        self.cache = None  # the batch-1 view of that row
        self.computed = 0  # tokens whose k/v are in the cache
        self.emitted = 0  # tokens of `out` already streamed
        self.generated = 0  # tokens sampled (stop ids removed from `out` included)
        self.finish_reason: Optional[str] = None
        self.arrival = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.cancel_requested = False

    @property
    def reservation(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    @property
    def in_prefill(self) -> bool:
        return self.computed < len(self.prompt)

    def chunk_end(self, prefill_chunk: int) -> int:
        """End of the next prefill chunk: the next multiple of `prefill_chunk`, or the prompt's end."""
        return min((self.computed // prefill_chunk + 1) * prefill_chunk, len(self.prompt))

    def next_segment(self, prefill_chunk: int) -> Segment:
        """The next prefill chunk (its logits wanted only when it ends the prompt)."""
        end = self.chunk_end(prefill_chunk)
        return Segment(self.prompt[self.computed:end], self.computed, self.cache, end == len(self.prompt))


class Scheduler:
    def __init__(self, kv: KVBudget, max_batch: int, prefill_chunk: int, max_step_tokens: int):
        self.kv, self.max_batch = kv, max_batch
        self.prefill_chunk, self.max_step_tokens = prefill_chunk, max_step_tokens
        self.waiting: Deque[Sequence] = collections.deque()
        self.running: List[Sequence] = []

    def admit(self) -> List[Sequence]:
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            row = self.kv.try_reserve(seq.reservation)
            if row is None:
                break
            seq.row, seq.cache = row, self.kv.row_cache(row)
            self.waiting.popleft()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> List[Sequence]:
        """The requests that feed tokens this step (decode rows first, then prefill chunks)."""
        chosen = [s for s in self.running if not s.in_prefill]
        rows, took_chunk = len(chosen), False
        for seq in [s for s in self.running if s.in_prefill]:
            n = seq.chunk_end(self.prefill_chunk) - seq.computed
            if took_chunk and rows + n > self.max_step_tokens:
                break
            chosen.append(seq)
            rows += n
            took_chunk = True
        return chosen

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and free its KV reservation."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.row is not None:
            self.kv.release(seq.row, seq.reservation)
            seq.row = seq.cache = None
