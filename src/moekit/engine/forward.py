"""One forward over a ragged batch: each segment is a run of new tokens of one request,
written into and attending over that request's own KV cache. Built for batch invariance.

    logits_RV = ragged_forward(model, [Segment(tokens, start, cache, want_logits), ...])

Batch invariance (the guarantee the engine documents): a request's logits are bitwise
the same whatever other segments share the forward. Two CPU effects break that in a naive
batched forward, and both were measured here (MKL, fp32, AVX-512):

  * GEMM rows: a row's result depends on the row count M: M=1 takes a GEMV kernel and the
    tail rows of small M (2, 3, 5, 6, 7, 9, 10, 11) other micro-kernels, all with other
    summation orders. With M a multiple of 4 every row goes through the same full-panel
    kernel and is bitwise a function of that row alone. So every GEMM here (projections,
    router, dense/shared FFN, each expert, lm_head) runs on rows padded to a multiple of
    `row_quantum` (default 4).
  * Elementwise transcendentals (sigmoid, silu, exp, cos/sin): the vectorized loop computes
    blocks of 2 SIMD vectors with a SLEEF-style approximation and the leftover tail with the
    scalar libm function, which rounds differently; so an element's bits depend on its
    offset in the flattened tensor (e.g. the router's (T, K) gate sigmoid). Here every such
    op runs through `_ew`, which pads the flattened input to a multiple of 64 x threads
    elements (no tail, and thread chunks stay vector-aligned); RoPE cos/sin come from a
    table over all positions, computed once.

Everything else is row-wise with a fixed order (norms, softmax/log-softmax per row, top-k,
sums over a row, index copies) or per request: attention runs per segment over the
request's own cache with a fresh contiguous q, so the SDPA call (shapes, strides,
alignment) is the one the request would make alone. The MoE groups (token, expert) pairs
by expert, runs each expert's rows through padded GEMMs, and sums a token's K expert
outputs in the fixed order k = 0..K-1. Chunk boundaries of a prompt are fixed by the
scheduler, so they do not depend on the load either.

`tests/test_engine.py` checks the end result (logprobs bitwise equal alone and co-batched,
requests joining at random steps), so a platform where the GEMM property does not hold
fails loudly instead of silently. Weight-only quantized models (moekit.quantize) keep the
guarantee: their Linear layers dequantize and run F.linear on the padded rows, and the
SwiGLU / experts weights are dequantized here and run through the same padded paths. Any
other replacement module is called through its own forward: correct, but its batch
invariance is then its own business.

Legend: N rows (tokens of all segments), Np rows padded, T tokens of a segment, D model dim,
H heads, G KV heads, Dh head dim, S keys, E experts, K experts per token, F expert dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..model import KVCache, attention_mask, rope_cos_sin
from ..moe.ffn import SwiGLU

PAD_ID = 0
ROW_QUANTUM = 4
EW_QUANTUM = 64  # elements per vectorized-loop iteration, with room for 512-bit bf16 vectors


@dataclass
class Segment:
    tokens: Sequence[int]  # new tokens of one request
    start: int  # cache index (= RoPE position) of the first one
    cache: KVCache  # that request's cache (batch 1)
    want_logits: bool  # return logits of the last token


def round_up(n: int, q: int) -> int:
    return -(-n // q) * q


def pad_rows(x_ND: torch.Tensor, q: int) -> torch.Tensor:
    n = x_ND.shape[0]
    n_pad = round_up(max(n, 1), q)
    return x_ND if n_pad == n else F.pad(x_ND, (0, 0, 0, n_pad - n))


def _ew(fn, x: torch.Tensor) -> torch.Tensor:
    """Elementwise `fn` with every element in the vectorized body (see the module docstring)."""
    flat = x.reshape(-1)
    n = flat.numel()
    n_pad = round_up(max(n, 1), EW_QUANTUM * max(1, torch.get_num_threads()))
    return fn(F.pad(flat, (0, n_pad - n)))[:n].view(x.shape)


def rope_table(model, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (S_max, Dh) for every position, computed once (a position's values never vary)."""
    positions_1S = torch.arange(model.cfg.max_seq_len, device=model.inv_freq.device)[None]
    cos, sin = rope_cos_sin(model.inv_freq, positions_1S, dtype)
    return cos[0], sin[0]


@torch.no_grad()
def ragged_forward(model, segments: List[Segment], row_quantum: int = ROW_QUANTUM,
                   rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Run the segments; return (R, V) float logits of the segments with want_logits, in order.

    `rope`: the `rope_table(model, dtype)` (computed here when not given; the engine caches it).
    """
    cfg = model.cfg
    device = model.embed.weight.device
    lens = [len(s.tokens) for s in segments]
    N = sum(lens)
    Np = round_up(N, row_quantum)
    tokens, positions = [], []
    for s in segments:
        tokens.extend(s.tokens)
        positions.extend(range(s.start, s.start + len(s.tokens)))
    tokens_1N = torch.tensor([tokens + [PAD_ID] * (Np - N)], dtype=torch.long, device=device)
    positions_N = torch.tensor(positions + [0] * (Np - N), dtype=torch.long, device=device)
    x_1ND = model.embed(tokens_1N)
    cos_SDh, sin_SDh = rope if rope is not None else rope_table(model, x_1ND.dtype)
    cos, sin = cos_SDh.index_select(0, positions_N)[None], sin_SDh.index_select(0, positions_N)[None]
    spans, a = [], 0  # (first row, end row, attention mask or None) of each segment
    for s, n in zip(segments, lens):
        mask = attention_mask(1, n, s.start, None, device) if s.start > 0 and n > 1 else None
        spans.append((a, a + n, mask))
        a += n
    for i, block in enumerate(model.layers):
        h_1ND = block.attn_norm(x_1ND)
        x_1ND = x_1ND + _attention(block.attn, i, h_1ND, cos, sin, segments, spans)
        h_ND = block.ffn_norm(x_1ND)[0]
        if block.is_moe:
            y_ND = moe_rows(block.ffn, h_ND, tokens_1N[0], N, row_quantum)
        else:
            y_ND = ffn_rows(block.ffn, h_ND)
        x_1ND = x_1ND + y_ND[None]
    last = [b - 1 for s, (_, b, _) in zip(segments, spans) if s.want_logits]
    if not last:
        return x_1ND.new_zeros(0, cfg.vocab_size, dtype=torch.float32)
    h_RD = pad_rows(x_1ND[0, last], row_quantum)
    return model.lm_head(model.norm(h_RD))[: len(last)].float()


def _attention(attn, layer_idx: int, h_1ND, cos, sin, segments: List[Segment], spans) -> torch.Tensor:
    cfg = attn.cfg
    q_1HND, k_1GND, v_1GND = attn._qkv(h_1ND, cos, sin)
    Np = h_1ND.shape[1]
    gqa = cfg.n_kv_heads != cfg.n_heads
    outs = []
    for seg, (a, b, mask_11TS) in zip(segments, spans):
        start, end = seg.start, seg.start + b - a
        k_cache, v_cache = seg.cache.k[layer_idx], seg.cache.v[layer_idx]  # (1, G, S, Dh)
        k_cache[:, :, start:end] = k_1GND[:, :, a:b]
        v_cache[:, :, start:end] = v_1GND[:, :, a:b]
        q_1HTDh = q_1HND[:, :, a:b].contiguous()
        # a whole prompt (causal), one decode token (sees every key), or a later chunk (offset causal mask)
        o = F.scaled_dot_product_attention(q_1HTDh, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask_11TS,
                                           is_causal=mask_11TS is None and b - a > 1, enable_gqa=gqa)
        outs.append(o.transpose(1, 2))
    if Np > spans[-1][1]:
        outs.append(h_1ND.new_zeros(1, Np - spans[-1][1], cfg.n_heads, cfg.head_dim))
    return attn.o_proj(torch.cat(outs, dim=1).view(1, Np, -1))


def swiglu_rows(w13_FD: torch.Tensor, w2_DF: torch.Tensor, x_ND: torch.Tensor) -> torch.Tensor:
    gate_NF, up_NF = F.linear(x_ND, w13_FD).chunk(2, dim=-1)
    return F.linear(_ew(F.silu, gate_NF) * up_NF, w2_DF)


def _weight(w, index=None, dtype=None) -> torch.Tensor:
    """A float weight (or its entry `index` of dim 0) from a tensor, or from a quantized weight
    (anything with `.dequantize(index, dtype)`, e.g. moekit.quantize's QuantizedWeight)."""
    if isinstance(w, torch.Tensor):
        return w if index is None else w[index]
    return w.dequantize(index, dtype)


def _has_weights(module) -> bool:
    return all(isinstance(getattr(module, n, None), torch.Tensor) or hasattr(getattr(module, n, None), "dequantize")
               for n in ("w13", "w2"))


def ffn_rows(ffn, x_ND: torch.Tensor) -> torch.Tensor:
    """A SwiGLU FFN (stock or quantized weights); another module runs its own forward."""
    if isinstance(ffn, SwiGLU) or _has_weights(ffn):
        return swiglu_rows(_weight(ffn.w13, dtype=x_ND.dtype), _weight(ffn.w2, dtype=x_ND.dtype), x_ND)
    return ffn(x_ND)


def route_rows(router, x_TD: torch.Tensor, token_ids_T: torch.Tensor):
    """`Router.route_static` (same selection and gates) with row-invariant elementwise ops."""
    cfg = router.cfg
    if cfg.router == "hash":
        return router.route_static(x_TD, token_ids_T)
    if cfg.router not in ("softmax_topk", "topk_softmax", "sigmoid_topk"):
        raise ValueError(f"the engine routes with the top-k and hash routers, not router={cfg.router!r}")
    logits_TE = router.logits(x_TD)
    bias_E = router.expert_bias.to(logits_TE.dtype)
    if cfg.router == "softmax_topk":
        select_TE = torch.softmax(logits_TE, dim=-1) + bias_E
    elif cfg.router == "topk_softmax":
        select_TE = logits_TE + bias_E
    else:
        select_TE = router._group_limit(_ew(torch.sigmoid, logits_TE) + bias_E)
    expert_idx_TK = torch.topk(select_TE, cfg.top_k, dim=-1).indices
    logit_TK = logits_TE.gather(1, expert_idx_TK)
    if cfg.router == "sigmoid_topk":
        gates_TK = _ew(torch.sigmoid, logit_TK)
        if cfg.norm_topk_prob:
            gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
    elif cfg.router == "softmax_topk" and not cfg.norm_topk_prob:
        gates_TK = _ew(torch.exp, logit_TK - torch.logsumexp(logits_TE, dim=-1, keepdim=True))
    else:
        gates_TK = torch.softmax(logit_TK, dim=-1)
    return expert_idx_TK, gates_TK * cfg.routed_scaling_factor


def moe_rows(moe, x_ND: torch.Tensor, token_ids_N: torch.Tensor, n_real: int, row_quantum: int) -> torch.Tensor:
    """MoE layer over Np rows (the first `n_real` are tokens, the rest padding) -> (Np, D)."""
    expert_idx_TK, gates_TK = route_rows(moe.router, x_ND, token_ids_N)
    expert_idx_TK, gates_TK = expert_idx_TK[:n_real], gates_TK[:n_real]
    experts = moe.experts
    if _has_weights(experts) and not torch.is_autocast_enabled(x_ND.device.type):
        routed_TD = experts_rows(x_ND[:n_real], experts.w13, experts.w2, expert_idx_TK, gates_TK, row_quantum)
    else:  # an experts module without w13/w2: its own forward, its own numerics
        T, K = expert_idx_TK.shape
        token_idx_P = torch.arange(T, device=x_ND.device).repeat_interleave(K)
        routed_TD = experts(x_ND[:n_real], gates_TK.reshape(-1), token_idx_P, expert_idx_TK.reshape(-1))
    y_ND = F.pad(routed_TD, (0, 0, 0, x_ND.shape[0] - n_real))
    if moe.shared is not None:
        shared_ND = ffn_rows(moe.shared, x_ND)
        if moe.shared_gate is not None:
            shared_ND = _ew(torch.sigmoid, moe.shared_gate(x_ND)) * shared_ND
        y_ND = y_ND + shared_ND
    return y_ND


def experts_rows(x_TD, w13_EFD, w2_EDF, expert_idx_TK, gates_TK, row_quantum: int) -> torch.Tensor:
    """Routed experts with row-invariant numerics: each expert's rows go through GEMMs whose
    row count is a multiple of `row_quantum`. The weights are tensors or quantized weights
    (dequantized here: only the active experts' on the loop path).

    Few experts active (decoding a small batch): a loop over them, F.linear on each one's rows
    (the other experts' weights are never read). Most experts active: one padded grid, E blocks
    of the same row count, two `bmm`s (no per-expert launches). Both give the same bits for a
    row (a padded bmm row equals the F.linear row; `tests/test_engine.py` checks the whole path).
    """
    T, K = expert_idx_TK.shape
    E, D = w13_EFD.shape[0], x_TD.shape[1]
    n = w2_EDF.shape[-1]
    dtype = x_TD.dtype
    if T == 0:
        return x_TD.new_zeros(0, D)
    expert_P = expert_idx_TK.reshape(-1)  # token-major pairs: pair p = t*K + k
    gates_P = gates_TK.reshape(-1).to(x_TD.dtype)
    order_P = torch.argsort(expert_P, stable=True)
    counts = torch.bincount(expert_P, minlength=E).tolist()
    x_ext_TD = F.pad(x_TD, (0, 0, 0, 1))  # row T is zeros: the padding rows gather it
    gates_ext_P = F.pad(gates_P, (0, 1))
    pad_pair = T * K
    y_PD = x_TD.new_empty(T * K, D)
    if 2 * sum(c > 0 for c in counts) > E:
        block = round_up(max(counts), row_quantum)
        counts_E = torch.tensor(counts, device=x_TD.device)
        expert_sorted_P = expert_P.index_select(0, order_P)
        rank_P = torch.arange(T * K, device=x_TD.device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_sorted_P]
        slot_P = expert_sorted_P * block + rank_P
        pair_R = torch.full((E * block,), pad_pair, dtype=torch.long, device=x_TD.device)
        pair_R[slot_P] = order_P
        tok_R = torch.where(pair_R == pad_pair, T, pair_R // K)
        x_EBD = x_ext_TD.index_select(0, tok_R).view(E, block, D)
        h_EB2F = torch.bmm(x_EBD, _weight(w13_EFD, dtype=dtype).transpose(1, 2))
        a_EBF = (_ew(F.silu, h_EB2F[..., :n]) * h_EB2F[..., n:]
                 * gates_ext_P.index_select(0, pair_R).view(E, block, 1))
        y_RD = torch.bmm(a_EBF, _weight(w2_EDF, dtype=dtype).transpose(1, 2)).view(E * block, D)
        y_PD.index_copy_(0, order_P, y_RD.index_select(0, slot_P))
    else:
        offset = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            pairs_c = order_P[offset:offset + c]
            offset += c
            c_pad = round_up(c, row_quantum)
            pairs_r = F.pad(pairs_c, (0, c_pad - c), value=pad_pair) if c_pad != c else pairs_c
            tok_r = torch.where(pairs_r == pad_pair, T, pairs_r // K)
            h_r2F = F.linear(x_ext_TD.index_select(0, tok_r), _weight(w13_EFD, e, dtype))
            a_rF = _ew(F.silu, h_r2F[:, :n]) * h_r2F[:, n:] * gates_ext_P.index_select(0, pairs_r)[:, None]
            y_PD.index_copy_(0, pairs_c, F.linear(a_rF, _weight(w2_EDF, e, dtype))[:c])
    y_TKD = y_PD.view(T, K, D)
    out_TD = y_TKD[:, 0].clone()
    for k in range(1, K):
        out_TD += y_TKD[:, k]
    return out_TD
