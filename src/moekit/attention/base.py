"""The attention interface, and the span loop every attention kind shares.

An attention kind is an `nn.Module` registered with `@register_attention("name")` that
implements:

    forward(x_BTD, plan, rope_BT) -> (B, T, D)   rope_BT = (cos, sin) of the plan's positions
    new_cache(batch, max_len, dtype, device)     its per-layer cache (cache.py)
    default_head_dim(cfg), check(cfg)            classmethods: ModelConfig's head_dim when unset, and
                                                 the kind's own config checks (ValueError naming values)

and runs its core through `attend_spans`: per span of the plan (plan.py) the layer cache
`update`s with the new tokens' state (the kind decides what is cached) and `attend` runs;
outputs join in row order, zero rows for the numerics padding. So training, prefill, decode,
the compiled step and the engine are one code path per kind. Adding a kind: docs/extending.md.

Legend: B batch, T tokens, S keys, H heads, G KV heads, R query heads per KV head (H / G),
D model dim, Dh head dim.
"""

from __future__ import annotations

from typing import List

import torch

from ..registry import Registry

ATTENTION_KINDS = Registry("attention kind")
register_attention = ATTENTION_KINDS.register
attention_class = ATTENTION_KINDS.get

# fields of ModelConfig that only the "mla" kind reads; the other kinds refuse them when set
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_interleave")


def refuse_fields(cfg, names, kind: str, why: str) -> None:
    """ValueError naming each of `names` that is set in cfg (they do not apply to this kind)."""
    set_ = [f"{n}={getattr(cfg, n)!r}" for n in names if getattr(cfg, n)]
    if set_:
        raise ValueError(f"ModelConfig {', '.join(set_)} {why}, not attention={kind!r}")


def take_rows(t: torch.Tensor, a: int, b: int, whole: bool) -> torch.Tensor:
    """Rows [a, b) of the token dim (dim 2 of a (B, H, T, Dh) tensor), contiguous as alone."""
    return t if whole else t[:, :, a:b].contiguous()


def attend_spans(plan, layer_idx: int, q_BHTDh: torch.Tensor, new_state, attend, in_place: bool = False):
    """Run `attend(q, state, span, plan.numerics)` for each span; `new_state` is a tuple of (B, *, T, *) tensors
    written to the span's layer cache first. Returns the (B, H, T, Dh) outputs in row order.
    in_place=True: a cache that can (a paged pool in a decode step on CPU) hands `attend` a `PagedKV`
    (attention/paged_cpu.py) instead of the gathered state; the kind's `attend` must take it."""
    T = q_BHTDh.shape[2]
    whole = len(plan.spans) == 1 and plan.spans[0].a == 0 and plan.spans[0].b == T
    outs: List[torch.Tensor] = []
    for span in plan.spans:
        q = take_rows(q_BHTDh, span.a, span.b, whole)
        state = tuple(take_rows(t, span.a, span.b, whole) for t in new_state)
        if span.cache is not None:
            layer = span.cache[layer_idx]
            paged = layer.read_in_place(*state, span) if in_place and hasattr(layer, "read_in_place") else None
            state = paged if paged is not None else layer.update(*state, span)
        outs.append(attend(q, state, span, plan.numerics))
    if whole:
        return outs[0]
    if plan.padded_from < T:
        B, H, _, Dh = outs[0].shape
        outs.append(q_BHTDh.new_zeros(B, H, T - plan.padded_from, Dh))
    return torch.cat(outs, dim=2)


def math_attention(q_BHTDh, k_BGSDh, v_BGSDh, mask_B1TS, sinks_H=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v with plain batched matmuls, GQA by grouping the query
    heads (no k/v copies). A row's bits do not depend on the batch size, unlike the CPU flash
    kernel's (its work split follows the thread count and the batch): the batch-invariant
    numerics use this form for batches of several rows (the engine's decode step).
    mask None: causal, the T queries being the last T of the S keys. sinks_H (gpt-oss): a learned
    logit per head joins each softmax as one more column, whose probability is then dropped."""
    B, H, T, Dh = q_BHTDh.shape
    G, S = k_BGSDh.shape[1], k_BGSDh.shape[2]
    R = H // G
    if mask_B1TS is None:
        k_S, q_T1 = torch.arange(S, device=q_BHTDh.device), torch.arange(S - T, S, device=q_BHTDh.device)[:, None]
        mask_B1TS = (k_S <= q_T1)[None, None]
    q_BGRTDh = q_BHTDh.reshape(B, G, R * T, Dh)
    scores = torch.matmul(q_BGRTDh, k_BGSDh.transpose(-1, -2)) * (Dh ** -0.5)  # (B, G, R*T, S)
    scores = scores.view(B, G, R, T, S).masked_fill(~mask_B1TS[:, :, None], float("-inf"))
    if sinks_H is None:
        probs = torch.softmax(scores.view(B, G, R * T, S), dim=-1)
    else:
        sinks_BGRT1 = sinks_H.to(scores.dtype).view(1, G, R, 1, 1).expand(B, G, R, T, 1)
        probs = torch.softmax(torch.cat([scores, sinks_BGRT1], dim=-1), dim=-1)[..., :S].reshape(B, G, R * T, S)
    return torch.matmul(probs, v_BGSDh).view(B, H, T, Dh)
