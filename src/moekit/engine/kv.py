"""KV-cache memory budget and admission accounting.

The budget is counted in tokens: an admitted request reserves prompt + max_tokens, and owns
one row of a pooled cache (`max_batch` rows of min(context, budget) slots, allocated once)
until it finishes, so the decode step runs all requests as one static-shape batch. So:

  * a running request can never run out of KV memory (no preemption, no recomputation);
  * the sum of reservations never exceeds the budget; a request that does not fit now
    waits in the queue, and one larger than the whole budget is rejected (KVBudgetError);
  * attention reads a request's cache as a plain strided view (no page gathers);
  * the price is reserving max_tokens up front, and the pool's memory is rows x row length
    whatever the budget admits (a paged pool would admit more, but needs preemption).

`parse_budget` reads "4096" (tokens) or sizes such as "64MiB", "1.5GB" (bytes of k + v).
"""

from __future__ import annotations

import re
import threading
from typing import Optional, Union

import torch

from .errors import KVBudgetError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30}


def kv_bytes_per_token(model, dtype: torch.dtype) -> int:
    """Bytes one token of one sequence occupies in the model's cache (every layer, of its kind)."""
    return model.new_cache(1, 1, dtype, "meta").nbytes_per_slot


def parse_budget(value: Union[str, int], model, dtype: torch.dtype) -> int:
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
            tokens = int(float(m.group(1)) * _UNITS[unit]) // kv_bytes_per_token(model, dtype)
    if tokens < 1:
        raise ValueError(f"KV budget {value!r} holds no token (each token needs "
                         f"{kv_bytes_per_token(model, dtype)} bytes of k/v)")
    return tokens


class KVBudget:
    """Token-granular reservations against a fixed budget, over one pooled cache.

    The pool (`self.cache`, from `model.new_cache`) has `rows` batch rows of `row_len` slots;
    an admitted request gets the lowest free row and owns it until it finishes. The engine's
    prefill writes a request's row through a batch-1 view (`row_cache`), and its decode step
    runs every row in [0, bucket) at once (static shapes). Memory: rows x row_len slots.
    """

    def __init__(self, model, rows: int, budget_tokens: int, dtype: torch.dtype, device):
        if isinstance(budget_tokens, bool) or not isinstance(budget_tokens, int) or budget_tokens < 1:
            raise ValueError(f"kv budget must be a positive number of tokens, got {budget_tokens!r}")
        cfg = model.cfg
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.capacity = budget_tokens
        self.reserved = 0
        self.rows = rows
        self.row_len = min(cfg.max_seq_len, budget_tokens)
        # one spare slot: every view of the first S <= row_len slots is then strided alike (not
        # contiguous), so the compiled decode step never recompiles for the view's layout
        self.cache = model.new_cache(rows, self.row_len + 1, dtype, self.device)
        self.bytes_per_token = kv_bytes_per_token(model, dtype)
        self.free_rows = list(range(rows))
        self._lock = threading.Lock()

    def check_fits(self, tokens: int) -> None:
        """Raise KVBudgetError when `tokens` can never fit (larger than the whole budget)."""
        if tokens > self.capacity:
            raise KVBudgetError(
                f"the request needs {tokens} tokens of KV cache (prompt + max_tokens) but the server's whole "
                f"KV budget is {self.capacity} tokens; lower max_tokens or shorten the prompt", "max_tokens")

    def try_reserve(self, tokens: int) -> Optional[int]:
        """A pool row with `tokens` reserved, or None when the budget (or the pool) has no room now."""
        with self._lock:
            if self.reserved + tokens > self.capacity or not self.free_rows:
                return None
            self.reserved += tokens
            self.free_rows.sort()
            return self.free_rows.pop(0)

    def row_cache(self, row: int):
        return self.cache.rows(row, row + 1)

    def release(self, row: int, tokens: int) -> None:
        with self._lock:
            self.reserved -= tokens
            self.free_rows.append(row)
            assert self.reserved >= 0
