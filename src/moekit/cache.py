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


# spare ring slots beyond the window: a rollback (speculative decoding's rejected drafts) of up to
# WINDOW_SPARE + 1 slots keeps every key the window still needs; a longer one raises ValueError
WINDOW_SPARE = 31


def window_visible(q_slot_BT: torch.Tensor, k_slot_BK: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T, K) bool: key slot k is visible to query slot q when q - window < k <= q (HF's sliding window:
    `window` keys, the query's own included)."""
    q_BT1, k_B1K = q_slot_BT[:, :, None], k_slot_BK[:, None, :]
    return (k_B1K <= q_BT1) & (k_B1K > q_BT1 - window)


class WindowKVCache:
    """Keys and values of a sliding-window layer in a ring of W = min(max_len, window + WINDOW_SPARE)
    slots: logical slot s lives at ring index s % W and `slot` (B, W) records which slot each index
    holds (-1: none). `update` attends over the ring as it was plus the new tokens (so a chunk longer
    than the ring is exact) and returns its own mask over them: the window, causality, the span's
    mask looked up at each key's slot, and only ring entries before the row's first new slot (so
    rewritten slots never show their old contents). Writes from slot 0 start a new sequence; one-token
    (static) writes land only at the row's next slot or its last. `max_len` is the logical length (what
    the plans index), `nbytes_per_slot` the bytes of one held position (as KVLayerCache: a conservative
    budget for the engine; the ring's memory is ring x that per sequence).
    """

    def __init__(self, k_BGWDh, v_BGWDh, slot_BW, window: int, max_len: int):
        self.k, self.v, self.slot, self.window, self.logical_len = k_BGWDh, v_BGWDh, slot_BW, window, max_len
        self.high = 0  # dense writes: the highest slot written + 1 (the rollback check)

    @classmethod
    def allocate(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, window: int, dtype,
                 device) -> "WindowKVCache":
        ring = min(max_len, window + WINDOW_SPARE)
        shape = (batch, kv_heads, ring, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   torch.full((batch, ring), -1, dtype=torch.long, device=device), window, max_len)

    @property
    def max_len(self) -> int:
        return self.logical_len

    @property
    def ring(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes_per_slot(self) -> int:
        return sum(t.shape[1] * t.shape[3] * t.element_size() for t in (self.k, self.v))

    def rows(self, a: int, b: int) -> "WindowKVCache":
        return type(self)(self.k[a:b], self.v[a:b], self.slot[a:b], self.window, self.logical_len)

    def slots(self, n: int) -> "WindowKVCache":
        """The same ring seen as a cache of n logical slots."""
        return type(self)(self.k, self.v, self.slot, self.window, min(n, self.logical_len))

    def check_rollback(self, start: int, end: int) -> None:
        need = max(0, start - self.window + 1)  # the oldest slot the new tokens see
        if start > 0 and need + self.ring < self.high:
            raise ValueError(f"sliding-window cache: writing from slot {start} after slot {self.high - 1} was "
                             f"written lost keys the window needs (a rollback of more than {WINDOW_SPARE + 1} "
                             f"slots; the ring keeps window + {WINDOW_SPARE})")
        self.high = end if start == 0 else max(self.high, end)

    def update(self, k_BGTDh: torch.Tensor, v_BGTDh: torch.Tensor, span):
        """(k, v, mask_B1TK) over the ring's K = W entries as they were, then the T new tokens; writes the
        new tokens (the last W of them) into the ring."""
        B, T = k_BGTDh.shape[0], k_BGTDh.shape[2]
        if span.row_slots_B is not None:
            q_slot_BT = span.row_slots_B[:, None]
        else:
            q_slot_BT = span.slots_T[None].expand(B, T)
            self.check_rollback(span.end - T, span.end)
        old_BW = self.slot
        old_BW = torch.where(old_BW < q_slot_BT[:, :1], old_BW, -1)  # entries at or past the first new slot: stale
        key_slot_BK = torch.cat([old_BW, q_slot_BT], dim=1)
        visible_BTK = window_visible(q_slot_BT, key_slot_BK, self.window) & (key_slot_BK >= 0)[:, None]
        mask = span.mask_B1TS
        if mask is not None:
            S = mask.shape[-1]
            idx_BTK = key_slot_BK.clamp(0, S - 1)[:, None, :].expand(B, T, -1)
            visible_BTK = visible_BTK & mask[:, 0].expand(B, T, S).gather(2, idx_BTK)
        k_BGKDh, v_BGKDh = torch.cat([self.k, k_BGTDh], dim=2), torch.cat([self.v, v_BGTDh], dim=2)
        if span.row_slots_B is not None:
            # a row's token goes in only at its next slot (or rewrites its last): the engine's padding
            # rows write at a far slot, which must not evict their keys (no host sync: old values rewritten)
            slot_B = span.row_slots_B
            rows_B, idx_B = torch.arange(B, device=k_BGTDh.device), slot_B % self.ring
            last_B = self.slot.max(dim=1).values
            ok_B = (slot_B == last_B) | (slot_B == last_B + 1)
            self.k[rows_B, :, idx_B] = torch.where(ok_B[:, None, None], k_BGTDh[:, :, 0], self.k[rows_B, :, idx_B])
            self.v[rows_B, :, idx_B] = torch.where(ok_B[:, None, None], v_BGTDh[:, :, 0], self.v[rows_B, :, idx_B])
            self.slot[rows_B, idx_B] = torch.where(ok_B, slot_B, self.slot[rows_B, idx_B])
        else:
            if span.end == T:  # a new sequence from slot 0: forget the previous one's slots
                self.slot.fill_(-1)
            n = min(T, self.ring)
            slots_n = span.slots_T[T - n:]
            idx_n = slots_n % self.ring
            self.k.index_copy_(2, idx_n, k_BGTDh[:, :, T - n:])
            self.v.index_copy_(2, idx_n, v_BGTDh[:, :, T - n:])
            self.slot.index_copy_(1, idx_n, slots_n[None].expand(B, n).contiguous())
        return k_BGKDh, v_BGKDh, visible_BTK[:, None]


class RecurrentLayerCache:
    """A linear-attention layer's fixed-size state per sequence (Gated DeltaNet): the last K - 1 conv
    inputs `conv` (B, C, K - 1) in the model dtype and the delta-rule state `state` (B, Hv, Dk, Dv) in
    float32 (float64 for float64 models). No slots: `nbytes_per_slot` is 0, `nbytes_per_sequence` the
    whole state; `max_len` is the logical length the plans index (as WindowKVCache). Writes are in
    place, so `rows` views write through to the pool. The layer (attention/gated_deltanet.py) reads
    `initial(span, ...)` and writes `update(...)`; `snapshot`/`restore` roll it back (speculative).
    """

    def __init__(self, conv_BCW: torch.Tensor, state_BHKV: torch.Tensor, max_len: int):
        self.conv, self.state, self.logical_len = conv_BCW, state_BHKV, max_len

    @classmethod
    def allocate(cls, batch: int, conv_dim: int, kernel: int, heads: int, key_dim: int, value_dim: int,
                 max_len: int, dtype, device) -> "RecurrentLayerCache":
        state_dtype = torch.promote_types(dtype, torch.float32)
        return cls(torch.zeros(batch, conv_dim, kernel - 1, dtype=dtype, device=device),
                   torch.zeros(batch, heads, key_dim, value_dim, dtype=state_dtype, device=device), max_len)

    @property
    def max_len(self) -> int:
        return self.logical_len

    @property
    def nbytes_per_slot(self) -> int:
        return 0

    @property
    def nbytes_per_sequence(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (self.conv, self.state))

    def rows(self, a: int, b: int) -> "RecurrentLayerCache":
        return type(self)(self.conv[a:b], self.state[a:b], self.logical_len)

    def slots(self, n: int) -> "RecurrentLayerCache":
        return type(self)(self.conv, self.state, min(n, self.logical_len))

    @staticmethod
    def starts_fresh(span, T: int) -> bool:
        """Whether the span's tokens begin their sequences (slot 0): then the state starts from zeros."""
        return span.row_slots_B is None and span.end - T == 0

    def update(self, conv_BCW: torch.Tensor, state_BHKV: torch.Tensor, active_rows=None) -> None:
        """Store the new states (only rows `active_rows` when given: the others keep theirs)."""
        if active_rows is None:
            self.conv.copy_(conv_BCW)
            self.state.copy_(state_BHKV)
        else:
            self.conv.index_copy_(0, active_rows, conv_BCW.index_select(0, active_rows).to(self.conv.dtype))
            self.state.index_copy_(0, active_rows, state_BHKV.index_select(0, active_rows).to(self.state.dtype))

    def snapshot(self):
        return self.conv.clone(), self.state.clone()

    def restore(self, snap) -> None:
        self.conv.copy_(snap[0])
        self.state.copy_(snap[1])
