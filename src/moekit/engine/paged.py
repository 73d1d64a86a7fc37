"""Paged layer caches: one layer's per-slot state in a pool of fixed-size blocks, read and
written through a slot table.

The engine's protocol for layer caches (`cache.py` builds them; docs/architecture.md):

  * paged (per-slot): `KVLayerCache` and subclasses that keep its `update` (MLA's
    `LatentLayerCache`), or any class that sets `paged = True`. Such a cache keeps one
    position per slot in its tensors `k` and `v`, shaped (B, X, S, Y) with slots on dim 2, and
    `update(k_new, v_new, span)` stores exactly those two tensors. The engine allocates it
    once as a batch-1 pool of N slots (`(num_blocks + 1) x block_size`) and hands the forward
    a `PagedLayerCache` view instead.
  * not paged: a class that sets `paged = False` (a sliding-window ring, a recurrent state),
    or overrides `update` without saying `paged = True`. Such a layer keeps per-request rows
    of a row pool as before paging (`rows(a, b)`, `slots(n)`); the engine calls its optional
    `reset_rows(a, b)` when a row is handed to a new (or recomputed) request. A model with
    such a layer runs without prefix caching.

Legend: B rows, X heads (or 1), S logical slots (positions), Y per-head dim, N pool slots, T new tokens.
"""

from __future__ import annotations

import torch

from ..attention import paged_cpu
from ..attention.paged_cpu import PagedKV
from ..cache import Cache, KVLayerCache


def is_paged(layer) -> bool:
    """Whether a layer cache can live in blocks (see the module docstring)."""
    declared = getattr(type(layer), "paged", None)
    if declared is not None:
        return bool(declared)
    return isinstance(layer, KVLayerCache) and type(layer).update is KVLayerCache.update


class PagedLayerCache:
    """A view of one layer's block pool: logical slot s of row b is pool slot `table_BS[b, s]`.

    Writes: prefill spans (batch 1) write their tokens at `table_BS[0, span.slots_T]`; decode
    steps (one token per row) write at `write_B`, the engine's per-row target (a trash slot for
    rows that do not decode). Reads gather slots [0, span.end) (or every slot) of every row
    (`update`), or, for a decode step on CPU, hand the pools and table to the in-place kernel
    (`read_in_place`, for the attention kinds that ask: attention/paged_cpu.py).
    """

    paged = True

    def __init__(self, pool_k_XNY: torch.Tensor, pool_v_XNY: torch.Tensor, table_BS: torch.Tensor,
                 write_B: torch.Tensor = None):
        self.pools = (pool_k_XNY, pool_v_XNY)
        self.table_BS, self.write_B = table_BS, write_B

    @property
    def max_len(self) -> int:
        return self.table_BS.shape[1]


    def update(self, k_BXTY: torch.Tensor, v_BXTY: torch.Tensor, span):
        """Write the new tokens, return (k, v) (B, X, S, Y): every row's slots gathered."""
        table_BS = self.write(k_BXTY, v_BXTY, span)
        B, S = table_BS.shape
        flat_N = table_BS.reshape(-1)
        return tuple(pool_XNY.index_select(1, flat_N).view(pool_XNY.shape[0], B, S, -1).transpose(0, 1)
                     for pool_XNY in self.pools)

    def read_in_place(self, k_BXTY: torch.Tensor, v_BXTY: torch.Tensor, span):
        """Write the new tokens, return a `PagedKV` (attention/paged_cpu.py): the pools and the slot table,
        read in place by the decode kernel, or None where it cannot run (then call `update`)."""
        if span.row_slots_B is None or not paged_cpu.usable(k_BXTY, self.pools[0]):
            return None
        return PagedKV(*self.pools, self.write(k_BXTY, v_BXTY, span))

    def write(self, k_BXTY: torch.Tensor, v_BXTY: torch.Tensor, span) -> torch.Tensor:
        """Store the new tokens' state; returns the slot table (B, S) the span reads."""
        if span.row_slots_B is not None:  # one new token per row
            for pool_XNY, new_BXTY in zip(self.pools, (k_BXTY, v_BXTY)):
                pool_XNY.index_copy_(1, self.write_B, new_BXTY[:, :, 0].transpose(0, 1))
        else:  # a prefill span of one request
            flat_T = self.table_BS[0].index_select(0, span.slots_T)
            for pool_XNY, new_BXTY in zip(self.pools, (k_BXTY, v_BXTY)):
                pool_XNY.index_copy_(1, flat_T, new_BXTY[0])
        return self.table_BS if span.end is None else self.table_BS[:, :span.end]


def decoding_view(cache: Cache, table_BS: torch.Tensor, write_B: torch.Tensor) -> Cache:
    """`cache` (the engine's decode view) with its paged layers reading through the slot table `table_BS` and
    writing row b at pool slot write_B[b]. Under torch.compile the step builds it from tensors it is given: the
    table read from each layer would be a tensor input of its own, with guards that they are the same one."""
    return Cache([PagedLayerCache(*layer.pools, table_BS, write_B) if isinstance(layer, PagedLayerCache) else layer
                  for layer in cache.layers])
