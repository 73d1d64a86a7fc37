"""The forward plan: everything that differs between training, prefill, decode, the compiled
step and the engine's ragged batches, as data for the one `Transformer.forward`.

    ForwardPlan.dense(tokens_BT, positions_BT, cache, start, key_mask_BS)   train / prefill / decode
    ForwardPlan.static_decode(positions_B1, row_slots_B, visible_BS, cache) compiled one-token step
    ForwardPlan.ragged(segments, numerics, rope_table)                      engine: requests side by side

A plan holds the RoPE positions, the numerics policy (numerics.py), a `static` flag (no
host syncs, input checks or aux: what torch.compile needs) and `Span`s: runs of rows of the
token dim that attend together, each with its cache, write slots, read length and mask.
Routing: `routed_experts` (a list) collects each MoE layer's chosen expert ids (rows of the
flattened token dim, K) in layer order, padding rows included; `forced_experts` (B, T, L, K)
replays given ids (L MoE layers; a row of -1 routes freely), the gates still from the router.
Legend: B batch, T new tokens, S cache slots, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .numerics import PLAIN, Numerics


@dataclass
class Span:
    a: int  # first row of the token dim
    b: int  # end row
    cache: Optional[object] = None  # a cache.Cache (all layers) or None
    slots_T: Optional[torch.Tensor] = None  # cache slots of the new tokens (every batch row)
    row_slots_B: Optional[torch.Tensor] = None  # one slot per batch row (T = 1)
    end: Optional[int] = None  # attend over slots [0, end); None: every slot (under `mask`)
    mask_B1TS: Optional[torch.Tensor] = None  # None: causal over the new tokens (T > 1) / all keys


@dataclass
class Segment:
    """One request's new tokens in a ragged batch, for its own batch-1 cache from slot `start`."""

    tokens: Sequence[int]
    start: int
    cache: object
    want_logits: bool


def attention_mask(B: int, T: int, start: int, key_mask_BS: Optional[torch.Tensor], device) -> torch.Tensor:
    """(B, 1, T, S) bool: query start+i sees keys j <= start+i that are not padding (and always itself)."""
    S = start + T
    q_idx_T1 = torch.arange(start, S, device=device)[:, None]
    k_idx_1S = torch.arange(S, device=device)[None, :]
    allowed_BTS = (k_idx_1S <= q_idx_T1).expand(B, T, S)
    if key_mask_BS is not None:
        allowed_BTS = allowed_BTS & key_mask_BS[:, None, :S] | (k_idx_1S == q_idx_T1)
    return allowed_BTS[:, None]


def stack_routed(routed: list, shape, device=None) -> torch.Tensor:
    """The MoE layers' (N, K) expert ids (N = the product of `shape`) as (*shape, L, K)."""
    if not routed:  # no MoE layer
        return torch.zeros(*shape, 0, 0, dtype=torch.long, device=device)
    return torch.stack(routed, dim=1).view(*shape, len(routed), routed[0].shape[-1])


@dataclass
class ForwardPlan:
    positions_BT: torch.Tensor
    spans: List[Span]
    numerics: Numerics = PLAIN
    static: bool = False
    rope_table: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (cos, sin) (S_max, Dh), or computed
    logits_rows: Optional[List[int]] = None  # rows of the token dim whose logits are returned (ragged)
    active_rows: Optional[torch.Tensor] = None  # static decode: batch rows that are real (the rest pad)
    routed_experts: Optional[list] = None  # a list: each MoE layer appends its expert ids (rows, K)
    forced_experts: Optional[torch.Tensor] = None  # (B, T, L, K) expert ids to replay (-1 rows: free)

    @property
    def padded_from(self) -> int:
        """Rows from here on belong to no span (numerics padding): their attention output is 0."""
        return self.spans[-1].b

    @classmethod
    def dense(cls, tokens_BT: torch.Tensor, positions_BT: Optional[torch.Tensor] = None, cache=None,
              start: int = 0, key_mask_BS: Optional[torch.Tensor] = None) -> "ForwardPlan":
        B, T = tokens_BT.shape
        device = tokens_BT.device
        if positions_BT is None:
            positions_BT = torch.arange(start, start + T, device=device).expand(B, T)
        mask = None
        if key_mask_BS is not None or (cache is not None and T > 1 and start > 0):
            mask = attention_mask(B, T, start, key_mask_BS, device)
        slots_T = None if cache is None else torch.arange(start, start + T, device=device)
        end = None if cache is None else start + T
        return cls(positions_BT, [Span(0, T, cache, slots_T, None, end, mask)])

    @classmethod
    def static_decode(cls, positions_B1: torch.Tensor, row_slots_B: torch.Tensor, key_mask_BS: torch.Tensor, cache,
                      numerics: Numerics = PLAIN, rope_table=None, static: bool = True) -> "ForwardPlan":
        """One new token per row written at `row_slots_B`; attention over every cache slot, masked
        to `key_mask_BS` (the caller's: True for the row's valid slots, its new one included)."""
        return cls(positions_B1, [Span(0, 1, cache, None, row_slots_B, None, key_mask_BS[:, None, None, :])],
                   numerics, static=static, rope_table=rope_table)

    @classmethod
    def ragged(cls, segments: Sequence[Segment], rows: int, numerics: Numerics, rope_table=None,
               device=None) -> "ForwardPlan":
        """Segments side by side in one (1, rows) batch (rows >= their tokens: the rest is padding)."""
        spans, positions, logits_rows, a = [], [], [], 0
        for s in segments:
            n = len(s.tokens)
            mask = attention_mask(1, n, s.start, None, device) if s.start > 0 and n > 1 else None
            slots_T = torch.arange(s.start, s.start + n, device=device)
            spans.append(Span(a, a + n, s.cache, slots_T, None, s.start + n, mask))
            positions.extend(range(s.start, s.start + n))
            if s.want_logits:
                logits_rows.append(a + n - 1)
            a += n
        positions_1N = torch.tensor([positions + [0] * (rows - a)], dtype=torch.long, device=device)
        return cls(positions_1N, spans, numerics, rope_table=rope_table, logits_rows=logits_rows)
