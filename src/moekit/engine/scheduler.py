"""Continuous-batching scheduler: the waiting queue, admission and growth against the KV blocks,
preemption, prefix hits, and which requests feed tokens each step (docs/architecture.md,
"The engine's two forwards").

Admission is first come first served: the oldest waiting request is admitted while fewer than
`max_batch` run and blocks for its known tokens (prompt, plus the tokens generated before a
preemption) are available beyond one growth block per running request; when it does not fit,
everything behind it waits too. Its prefix hits (cached full blocks of the same tokens) are
shared and skip their prefill; the rest of its known tokens get blocks at once. A decoding
request takes one more block each `block_size` tokens; when none is left, the newest running
request is preempted: its blocks are released, and it waits at the head of the queue to be
recomputed (the oldest running request always progresses).

Recomputation gives the tokens the request would have had: its sampling generator is kept, the
prompt is prefilled in the same chunks, and under batch-invariant numerics its generated tokens
are fed again through decode steps (their k/v bitwise as first computed; nothing is sampled
until the last one). Under plain numerics they are prefilled with the prompt.

Each step, every request past its prefill decodes one token, and requests in their prefill
feed their next chunk, oldest first, within `max_step_tokens` rows (at least one chunk).
Chunk boundaries are multiples of `prefill_chunk` from the prompt start, never load-dependent.

Prefix caching: a block is registered for hits once its k/v are final and equal to what any
request with the same leading tokens computes: under batch-invariant numerics, the blocks of
whole prefill chunks (`prefill_chunk` tokens ending at a multiple of it) and hits are rounded
down to whole chunks (bitwise equal to recomputing them); under plain numerics every computed
full block, hits in whole blocks. The last prompt token is always computed (its logits).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Deque, List, Optional

from ..plan import Segment
from .blocks import chain_hashes
from .kv import KVPool, blocks_for
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
        self.row: Optional[int] = None  # its row of the decode bucket while admitted
        self.blocks: List[int] = []  # its block table
        self.hashes: List[int] = []  # hash chain of its full known blocks
        self.registered = 0  # leading blocks registered (or hit) in the prefix cache
        self.computed = 0  # tokens whose k/v are in the cache
        self.prefill_end = len(prompt)  # tokens fed by prefill chunks (then by decode steps)
        self.admitted_before = False
        self.emitted = 0  # tokens of `out` already streamed
        self.generated = 0  # tokens sampled (stop ids removed from `out` included)
        self.finish_reason: Optional[str] = None
        self.arrival = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.cancel_requested = False

    @property
    def known(self) -> int:
        """Tokens known so far: prompt + generated."""
        return len(self.prompt) + len(self.out)

    def token(self, i: int) -> int:
        return self.prompt[i] if i < len(self.prompt) else self.out[i - len(self.prompt)]

    @property
    def in_prefill(self) -> bool:
        return self.computed < self.prefill_end

    @property
    def samples(self) -> bool:
        """Whether this step's logits are sampled (not a recomputation of known tokens)."""
        return self.computed == self.known - 1 if not self.in_prefill else False

    def chunk_end(self, prefill_chunk: int) -> int:
        """End of the next prefill chunk: the next multiple of `prefill_chunk`, or the prefill's end."""
        return min((self.computed // prefill_chunk + 1) * prefill_chunk, self.prefill_end)

    def next_segment(self, prefill_chunk: int, kv: KVPool) -> Segment:
        """The next prefill chunk (its logits wanted only when it ends the known tokens)."""
        end = self.chunk_end(prefill_chunk)
        tokens = [self.token(i) for i in range(self.computed, end)]
        return Segment(tokens, self.computed, kv.segment_cache(self.row, end), end == self.known)


class Scheduler:
    def __init__(self, kv: KVPool, max_batch: int, prefill_chunk: int, max_step_tokens: int,
                 prefix_caching: bool, batch_invariant: bool, metrics):
        self.kv, self.max_batch = kv, max_batch
        self.prefill_chunk, self.max_step_tokens = prefill_chunk, max_step_tokens
        self.prefix_caching, self.batch_invariant, self.metrics = prefix_caching, batch_invariant, metrics
        bs = kv.block_size
        # hits and registrations in whole prefill chunks under invariance (see the module docstring)
        self.hit_quantum = bs * prefill_chunk // math.gcd(bs, prefill_chunk) if batch_invariant else bs
        self.waiting: Deque[Sequence] = collections.deque()
        self.running: List[Sequence] = []  # in arrival order

    # ------------------------------------------------------------------ admission
    def admit(self) -> List[Sequence]:
        """Admit what fits; returns the requests admitted for the first time (not recomputations)."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch and self.kv.free_rows:
            seq = self.waiting[0]
            first = not seq.admitted_before
            if not self.try_admit(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            self.running.sort(key=lambda s: s.id)
            if first:
                admitted.append(seq)
        return admitted

    def try_admit(self, seq: Sequence) -> bool:
        kv, pool, bs = self.kv, self.kv.blocks, self.kv.block_size
        known = seq.known
        hits: List[int] = []
        if self.prefix_caching:
            tokens = seq.prompt + seq.out
            seq.hashes = chain_hashes(tokens, bs, seq.hashes)
            usable = (known - 1) // self.hit_quantum * self.hit_quantum  # leave the last token to compute
            hits = pool.lookup(seq.hashes[:usable // bs])
            hit_tokens = len(hits) * bs // self.hit_quantum * self.hit_quantum
            hits = hits[:hit_tokens // bs]
        need = blocks_for(known, bs) - len(hits)
        spare = pool.available - sum(1 for b in hits if pool.refs[b] == 0) - need
        if spare < len(self.running):  # keep a growth block per running request
            return False
        pool.take(hits)
        new = [pool.allocate() for _ in range(need)]
        seq.row = kv.take_row()
        seq.blocks = hits + new
        kv.set_blocks(seq.row, 0, seq.blocks)
        seq.computed, seq.registered = len(hits) * bs, len(hits)
        seq.prefill_end = len(seq.prompt) if self.batch_invariant else known
        if not seq.admitted_before:
            seq.admitted_before = True
            self.metrics.count("prefix_query_tokens", len(seq.prompt))
            self.metrics.count("prefix_hit_tokens", seq.computed)
        return True

    # ------------------------------------------------------------------ each step
    def plan(self) -> List[Sequence]:
        """The requests that feed tokens this step (decode rows first, then prefill chunks), with
        a block for every decode write (preempting the newest requests when blocks run out)."""
        decoding = [s for s in self.running if not s.in_prefill]
        count = len(self.running)
        for seq in decoding:
            # (a request preempted for an earlier one's block is no longer running: membership checked only then)
            if (len(self.running) == count or seq in self.running) and not self.grow(seq):
                self.preempt(seq)
        chosen = decoding if len(self.running) == count else [s for s in self.running if not s.in_prefill]
        rows, took_chunk = len(chosen), False
        for seq in [s for s in self.running if s.in_prefill]:
            n = seq.chunk_end(self.prefill_chunk) - seq.computed
            if took_chunk and rows + n > self.max_step_tokens:
                break
            chosen.append(seq)
            rows += n
            took_chunk = True
        return chosen

    def grow(self, seq: Sequence) -> bool:
        """A block for the slot the next decode step writes, preempting newer requests for it;
        False when `seq` itself is the newest and none is left."""
        bs = self.kv.block_size
        while seq.computed // bs >= len(seq.blocks):
            block = self.kv.blocks.allocate()
            if block is None:
                victim = self.running[-1]
                if victim is seq:
                    return False
                self.preempt(victim)
                continue
            self.kv.set_blocks(seq.row, len(seq.blocks), [block])
            seq.blocks.append(block)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.release(seq)
        self.running.remove(seq)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.metrics.count("preemptions")

    def register_computed(self, seq: Sequence) -> None:
        """Register the blocks whose k/v became final for hits (see the module docstring)."""
        if not self.prefix_caching:
            return
        bs = self.kv.block_size
        if self.batch_invariant:
            end = min(seq.computed, len(seq.prompt)) // self.prefill_chunk * self.prefill_chunk
        else:
            end = seq.computed
        full = end // bs
        if full > seq.registered:
            seq.hashes = chain_hashes(seq.prompt + seq.out, bs, seq.hashes)
            for i in range(seq.registered, full):
                self.kv.blocks.register(seq.blocks[i], seq.hashes[i])
            seq.registered = full

    # ------------------------------------------------------------------ leaving
    def release(self, seq: Sequence) -> None:
        if seq.row is not None:
            self.kv.blocks.release(seq.blocks)
            self.kv.release_row(seq.row)
            seq.row, seq.blocks, seq.registered = None, [], 0

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
