"""The per-layer cache interface: what each attention layer keeps between forwards.

    cache = model.new_cache(batch=2, max_len=128)     # one LayerCache per layer
    logits = model(tokens_BT, cache=cache, start=0)   # writes, then attends over the cache

A `Cache` is a list of per-layer caches, each built by its layer's attention kind, so layers
can hold different state: keys and values (`KVLayerCache`), MLA's latent and shared rotary key
(`LatentLayerCache`); a window with sinks or a recurrent state are other classes with the same operations
(docs/architecture.md):

    update(new state, span) -> what the layer attends over; `span` (plan.py) says where the
                    tokens go (`slots_T`, or `row_slots_B` one per row) and what to read back
    rows(a, b)      a view of batch rows [a, b) (the engine's per-request view of its pool)
    slots(n)        a view of the first n slots (the engine's bucketed cache length)
    nbytes_per_slot bytes one position of one sequence takes (the engine's KV budget)
Legend: B batch rows, G KV heads, S cache slots, T new tokens, Dh head dim, C latent (kv_lora_rank),
R rotary key dim (qk_rope_head_dim).
"""

from __future__ import annotations

from typing import List, Sequence

import torch


class KVLayerCache:
    """Keys and values of one attention layer: k, v (B, G, S, Dh)."""

    def __init__(self, k_BGSDh: torch.Tensor, v_BGSDh: torch.Tensor):
        self.k, self.v = k_BGSDh, v_BGSDh

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device) -> "KVLayerCache":
        shape = (batch, kv_heads, max_len, head_dim)
        # zeros, not empty: a static step attends over unwritten slots with probability 0, and 0 * NaN is NaN
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes_per_slot(self) -> int:
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in (self.k, self.v))

    def rows(self, a: int, b: int) -> "KVLayerCache":
        return type(self)(self.k[a:b], self.v[a:b])

    def slots(self, n: int) -> "KVLayerCache":
        """A view of the first n slots."""
        return type(self)(self.k[:, :, :n], self.v[:, :, :n])

    def update(self, k_BGTDh: torch.Tensor, v_BGTDh: torch.Tensor, span):
        """Write the new keys/values where `span` says; return (k, v) to attend over."""
        if span.row_slots_B is not None:  # one new token per row, each at its own slot
            rows_B = torch.arange(k_BGTDh.shape[0], device=k_BGTDh.device)
            self.k[rows_B, :, span.row_slots_B] = k_BGTDh[:, :, 0]
            self.v[rows_B, :, span.row_slots_B] = v_BGTDh[:, :, 0]
        else:
            self.k.index_copy_(2, span.slots_T, k_BGTDh)
            self.v.index_copy_(2, span.slots_T, v_BGTDh)
        if span.end is None:
            return self.k, self.v
        return self.k[:, :, :span.end], self.v[:, :, :span.end]


class LatentLayerCache(KVLayerCache):
    """MLA's per-token state: the normed latent (B, 1, S, C) in `k` and the rotated shared key
    (B, 1, S, R) in `v`; the attention expands (or absorbs) kv_b_proj when it reads them.
    Bytes per slot: (C + R) x element size."""

    @classmethod
    def allocate(cls, batch: int, max_len: int, latent_dim: int, rope_dim: int, dtype, device) -> "LatentLayerCache":
        return cls(torch.zeros(batch, 1, max_len, latent_dim, dtype=dtype, device=device),
                   torch.zeros(batch, 1, max_len, rope_dim, dtype=dtype, device=device))


class Cache:
    """One layer cache per layer (any mix of kinds)."""

    def __init__(self, layers: Sequence):
        self.layers: List = list(layers)

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    @property
    def nbytes_per_slot(self) -> int:
        return sum(layer.nbytes_per_slot for layer in self.layers)

    def rows(self, a: int, b: int) -> "Cache":
        return Cache([layer.rows(a, b) for layer in self.layers])

    def slots(self, n: int) -> "Cache":
        return Cache([layer.slots(n) for layer in self.layers])

    def __getitem__(self, i: int):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)
