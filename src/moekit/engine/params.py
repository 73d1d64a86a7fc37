"""Per-request sampling parameters and their validation.

    SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, top_k=None, seed=1,
                   stop=["\\n\\n"], stop_token_ids=[0, [13, 13]], ignore_eos=False, logprobs=False)

Sampling follows `moekit.generate` (temperature 0 = greedy; else logits / temperature,
top-k, top-p, then a draw from the request's own `torch.Generator`, seeded by `seed`).
Stopping: `stop` strings (need a tokenizer; the text is cut before the match),
`stop_token_ids` (single ids or id sequences; not returned, as in `generate`), the
engine's EOS ids unless `ignore_eos`, and `max_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple, Union

from .errors import ParamError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[Union[int, Sequence[int]]] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # record the log-probability of each chosen token

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def validate(self, vocab_size: int, has_tokenizer: bool) -> None:
        """Raise ParamError naming the first invalid field."""
        mt = self.max_tokens
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise ParamError(f"max_tokens must be an integer >= 1, got {mt!r}", "max_tokens")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ParamError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}", "temperature")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ParamError(f"top_p must be in (0, 1], got {p!r}", "top_p")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ParamError(f"top_k must be None or an integer >= 1, got {k!r}", "top_k")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            raise ParamError(f"seed must be an integer, got {s!r}", "seed")
        if isinstance(self.stop, str):
            raise ParamError("stop must be a list of strings (wrap a single string in a list)", "stop")
        for item in self.stop:
            if not isinstance(item, str) or not item:
                raise ParamError(f"stop strings must be non-empty strings, got {item!r}", "stop")
        if self.stop and not has_tokenizer:
            raise ParamError("stop strings need a tokenizer; this engine has none (use stop_token_ids)", "stop")
        stop_sequences(self.stop_token_ids, (), vocab_size)


def stop_sequences(stop_token_ids, eos_ids: Sequence[int], vocab_size: int) -> List[Tuple[int, ...]]:
    """Every stop id / id sequence as a tuple (a single id becomes a 1-tuple)."""
    seqs = []
    for item in list(stop_token_ids) + list(eos_ids):
        seq = (item,) if isinstance(item, int) and not isinstance(item, bool) else item
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
            raise ParamError(f"stop_token_ids entry {item!r} must be a token id or a list of ids", "stop_token_ids")
        seq = tuple(seq)
        if not seq or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in seq):
            raise ParamError(f"stop_token_ids entry {item!r} must hold ids in [0, {vocab_size})", "stop_token_ids")
        seqs.append(seq)
    return seqs


@dataclass
class Completion:
    """The outcome of one request (one choice)."""

    prompt_tokens: int
    token_ids: List[int]
    text: Optional[str]  # None without a tokenizer
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    logprobs: Optional[List[float]] = None
    error: Optional[str] = None
    time_to_first_token: Optional[float] = None  # seconds from submission
    latency: Optional[float] = None  # seconds from submission to the end
    generated_tokens: int = 0  # tokens sampled, stop ids that were removed included (usage)


@dataclass
class Event:
    """A streaming update: new tokens (and text) since the last event; `finish_reason` on the last one."""

    token_ids: List[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    completion: Optional[Completion] = None  # set on the last event
