"""KV-cache memory budget and admission accounting.

Design (documented choice between "fixed slots" and "pages"): the budget is counted in
tokens, and a request reserves, when it is admitted, room for its whole lifetime:
prompt length + max_tokens. Its keys and values live in one contiguous `KVCache` of
exactly that length (batch 1: (L, 1, G, S, Dh) for k and for v), allocated at admission
and freed when the request finishes or is cancelled. So:

  * a running request can never run out of KV memory (no preemption, no recomputation);
  * the sum of reservations never exceeds the budget; a request that does not fit now
    waits in the queue, and one larger than the whole budget is rejected (KVBudgetError);
  * attention reads each request's cache as a plain strided view -- no page gather copies,
    which on a CPU would cost as much memory traffic as the attention itself;
  * the price is reserving max_tokens up front: a request that stops early held more than
    it used. (A paged pool with on-demand growth would admit more requests, but needs
    preemption when pages run out; not worth it at the batch sizes a CPU serves.)

`parse_budget` reads "4096" (tokens) or sizes such as "64MiB", "1.5GB" (bytes of k + v).

Legend: L layers, G KV heads, S reserved tokens, Dh head dim.
"""

from __future__ import annotations

import re
import threading
from typing import Optional, Union

import torch

from ..config import ModelConfig
from ..model import KVCache
from .errors import KVBudgetError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of keys + values one token occupies across all layers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def parse_budget(value: Union[str, int], cfg: ModelConfig, dtype: torch.dtype) -> int:
    """A KV budget in tokens from an int / digit string (tokens) or a size with a unit (bytes)."""
    if isinstance(value, int) and not isinstance(value, bool):
        tokens = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"KV budget {value!r} is neither a token count (e.g. 8192) nor a size "
                             "(e.g. 256MiB, 1GB)")
        if unit == "":
            tokens = int(float(m.group(1)))
        else:
            tokens = int(float(m.group(1)) * _UNITS[unit]) // kv_bytes_per_token(cfg, dtype)
    if tokens < 1:
        raise ValueError(f"KV budget {value!r} holds no token (each token needs "
                         f"{kv_bytes_per_token(cfg, dtype)} bytes of k/v)")
    return tokens


class KVBudget:
    """Token-granular reservations against a fixed budget; hands out per-request caches."""

    def __init__(self, cfg: ModelConfig, budget_tokens: int, dtype: torch.dtype, device):
        if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) or budget_tokens < 1:
            raise ValueError(f"kv budget must be a positive number of tokens, got {budget_tokens!r}")
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.capacity = budget_tokens
        self.reserved = 0
        self.bytes_per_token = kv_bytes_per_token(cfg, dtype)
        self._lock = threading.Lock()

    def check_fits(self, tokens: int) -> None:
        """Raise KVBudgetError when `tokens` can never fit (larger than the whole budget)."""
        if tokens > self.capacity:
            raise KVBudgetError(
                f"the request needs {tokens} tokens of KV cache (prompt + max_tokens) but the server's whole "
                f"KV budget is {self.capacity} tokens; lower max_tokens or shorten the prompt", "max_tokens")

    def try_allocate(self, tokens: int) -> Optional[KVCache]:
        """A cache for `tokens` positions, or None when the budget has no room now."""
        with self._lock:
            if self.reserved + tokens > self.capacity:
                return None
            self.reserved += tokens
        shape = (self.cfg.n_layers, 1, self.cfg.n_kv_heads, tokens, self.cfg.head_dim)
        # uninitialised: every slot is written before attention reads it
        return KVCache(torch.empty(shape, dtype=self.dtype, device=self.device),
                       torch.empty(shape, dtype=self.dtype, device=self.device))

    def release(self, cache: KVCache) -> None:
        with self._lock:
            self.reserved -= cache.max_len
            assert self.reserved >= 0

    @property
    def free(self) -> int:
        return self.capacity - self.reserved
