"""FLOPs, bytes and speeds of a whole model (`Arch`) on given hardware, with the conventions of
docs/formulas.md#inference-arithmetic (matmul FLOPs only, full-context attention, training = 3 × forward).
Gated DeltaNet layers (hybrids) have no KV cache and no attention over the context: a fixed state per
sequence and the delta rule's FLOPs, in its recurrent form in decode and its chunked form over a span of
several tokens (docs/formulas.md#hybrid-linear-attention).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from . import formulas
from .arch import Arch
from .params import COMPONENTS, active_numel, model_tensors
from .precision import Precision


def attention_score_flops(arch: Arch, ctx: float) -> float:
    """Per token per layer: the QKᵀ and AV matmuls over ctx keys."""
    a = arch.attention
    if a is None:
        return 0.0
    if a.kind == "mla":
        return 2 * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim) * ctx + 2 * a.n_heads * a.v_head_dim * ctx
    return 4 * a.n_heads * a.head_dim * ctx


def linear_mixer_flops(arch: Arch, span: float) -> float:
    """Per token per Gated DeltaNet layer beyond its projections: the depthwise conv 2·C·K and the delta
    rule, one token at a time (span <= 1: decode) or chunked over a forward of `span` tokens (chunks of
    min(64, span), the last one padded)."""
    a = arch.attention
    if a is None or not a.linear_layers:
        return 0.0
    Hv, Dk, Dv = a.linear_value_heads, a.linear_key_dim, a.linear_value_dim
    conv = 2 * a.linear_conv_dim * a.linear_conv_kernel
    if span <= 1:
        return conv + formulas.delta_rule_step_flops(Hv, Dk, Dv)
    chunk = min(formulas.DELTA_RULE_CHUNK, span)
    padded = math.ceil(span / chunk) * chunk / span
    return conv + padded * formulas.delta_rule_chunked_flops(Hv, Dk, Dv, chunk)


def matmul_params_by_component(arch: Arch) -> Dict[str, int]:
    """Weights one token multiplies (FLOPs = 2 x these), by component; the embedding lookup is free."""
    out = {c: 0 for c in COMPONENTS}
    for x in model_tensors(arch):
        if x.matrix and x.component != "embedding":
            out[x.component] += active_numel(arch, x)
    if arch.tie_embeddings and arch.vocab_size:
        out["head"] += arch.vocab_size * arch.d_model
    return out


def flops_by_component(arch: Arch, ctx: float, span: Optional[float] = None) -> Dict[str, float]:
    """Forward FLOPs per token by component at a context of ctx tokens, in a forward of `span` tokens
    (default ctx; 1 = a decode step): the span decides the delta rule's form (`linear_mixer_flops`)."""
    out = {c: 2.0 * n for c, n in matmul_params_by_component(arch).items()}
    a = arch.attention
    linear = a.linear_layers if a is not None else 0
    out["attention"] += (arch.n_layers - linear) * attention_score_flops(arch, ctx)
    out["attention"] += linear * linear_mixer_flops(arch, ctx if span is None else span)
    return out


def forward_flops_per_token(arch: Arch, ctx: float, span: Optional[float] = None) -> float:
    return sum(flops_by_component(arch, ctx, span).values())


def kv_bytes_per_token(arch: Arch, nbytes: float, ctx: float = 0) -> float:
    """KV cache bytes per token of the attention layers (Gated DeltaNet layers hold none); with a context
    `ctx`, sliding-window layers count min(ctx, W) / ctx of theirs (their cache holds only the window)."""
    a = arch.attention
    if a is None:
        return 0.0
    attn_layers = arch.n_layers - a.linear_layers
    if a.kind == "mla":
        return attn_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * nbytes
    per_layer = formulas.kv_bytes_per_token(1, a.n_kv_heads, a.head_dim, nbytes)
    held = min(ctx, a.sliding_window) / ctx if ctx and a.sliding_window else 1.0
    return per_layer * (attn_layers - a.sliding_layers + a.sliding_layers * held)


def state_bytes_per_sequence(arch: Arch, nbytes: float) -> float:
    """The fixed recurrent state of one sequence over all Gated DeltaNet layers: conv inputs at the cache
    dtype (`nbytes`), the delta-rule state in float32 (cache.RecurrentLayerCache)."""
    a = arch.attention
    if a is None or not a.linear_layers:
        return 0.0
    return a.linear_layers * formulas.recurrent_state_bytes(a.linear_value_heads, a.linear_key_dim,
                                                            a.linear_value_dim, a.linear_conv_dim,
                                                            a.linear_conv_kernel, nbytes)


def weight_bytes_by_component(arch: Arch, prec: Precision) -> Dict[str, float]:
    """Stored bytes: matrices at `prec` (scales included), vectors and the router in 16-bit."""
    out = {c: 0.0 for c in COMPONENTS}
    for x in model_tensors(arch):
        if x.matrix and x.component != "router":
            out[x.component] += prec.matrix_bytes(x.rows, x.cols) * x.count
        else:
            out[x.component] += x.numel * prec.float_bytes
    return out


def decode_step_bytes(arch: Arch, prec: Precision, B: int, ctx: float, kv_nbytes: float) -> float:
    """Bytes moved by one decode step at batch B: weights touched, the KV cache read, each sequence's
    recurrent state read and written."""
    return (weight_read_bytes(arch, prec, B) + B * ctx * kv_bytes_per_token(arch, kv_nbytes, ctx)
            + 2 * B * state_bytes_per_sequence(arch, kv_nbytes))


def weight_read_bytes(arch: Arch, prec: Precision, tokens: float) -> float:
    """Weight bytes a forward of `tokens` tokens reads: all but the embedding table (unless the head is
    tied to it) and the experts, of which those the tokens touch."""
    by = weight_bytes_by_component(arch, prec)
    read = sum(v for c, v in by.items() if c not in ("embedding", "experts"))
    if arch.tie_embeddings:
        read += by["embedding"]  # the head reads the tied table
    moe = arch.moe
    if moe is not None:
        read += by["experts"] * formulas.experts_touched(moe.num_experts, moe.top_k, tokens) / moe.num_experts
    return read


def decode(arch: Arch, prec: Precision, hw_flops: float, bw: float, B: int, ctx: float, kv_nbytes: float) -> Dict[str, float]:
    flops = B * forward_flops_per_token(arch, ctx, span=1)
    nbytes = decode_step_bytes(arch, prec, B, ctx, kv_nbytes)
    t_compute, t_memory = flops / hw_flops, nbytes / bw
    t = max(t_compute, t_memory)
    return {"tokens_per_s": B / t, "step_s": t, "flops": flops, "bytes": nbytes,
            "bound": "compute" if t_compute >= t_memory else "memory"}


def prefill(arch: Arch, prec: Precision, hw_flops: float, bw: float, B: int, ctx: int, kv_nbytes: float) -> Dict[str, float]:
    """B prompts of ctx tokens: all weights read once (experts touched at B·ctx tokens), FLOPs at the causal
    mean context (ctx + 1)/2 (the delta rule chunked over ctx), the KV and recurrent state written once."""
    tokens = B * ctx
    flops = tokens * forward_flops_per_token(arch, (ctx + 1) / 2, span=ctx)
    nbytes = (weight_read_bytes(arch, prec, tokens) + tokens * kv_bytes_per_token(arch, kv_nbytes)
              + B * state_bytes_per_sequence(arch, kv_nbytes))
    t_compute, t_memory = flops / hw_flops, nbytes / bw
    t = max(t_compute, t_memory)
    return {"tokens_per_s": tokens / t, "s": t, "bound": "compute" if t_compute >= t_memory else "memory"}


def break_even_batch(arch: Arch, prec: Precision, hw_flops: float, bw: float, ctx: float, kv_nbytes: float,
                     limit: int = 1 << 16) -> int:
    """Smallest batch at which decode turns compute-bound (experts touched and KV included); 0 if never."""
    if decode(arch, prec, hw_flops, bw, limit, ctx, kv_nbytes)["bound"] == "memory":
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(arch, prec, hw_flops, bw, mid, ctx, kv_nbytes)["bound"] == "compute":
            hi = mid
        else:
            lo = mid + 1
    return lo


def activation_bytes_per_moe_layer(d: int, n: int, E: int, K: int, T: int, act_bytes: float) -> Dict[str, float]:
    """Bytes one MoE layer's experts keep for backward, by caching policy: moekit X (T, d) and H (T·K, 2n)
    (the grouped backend's memory contract, docs/architecture.md); scattermoe also A (T·K, n) and Y (T·K, d);
    naive also the gathered X (T·K, d). Each adds the routing metadata: gates (T·K, activation dtype), pair
    order and token index (2·T·K int64), per-expert counts (E int64)."""
    P = T * K
    meta = P * act_bytes + 2 * P * 8 + E * 8
    x, h, a, y = T * d * act_bytes, P * 2 * n * act_bytes, P * n * act_bytes, P * d * act_bytes
    return {"moekit": x + h + meta, "scattermoe": x + h + a + y + meta, "naive": x + P * d * act_bytes + h + a + y + meta}
