"""Routed experts with batch-invariant numerics (the engine's policy; docs/architecture.md,
"Batch-invariant numerics"): each expert's GEMM rows are padded to a multiple of `row_quantum`
and SwiGLU uses the policy's padded elementwise op, so a token's output is bitwise the same
whatever other tokens share the call. Eager only (it reads the expert counts).

Few experts active, or loads so uneven that padding every expert to the busiest one would add over a quarter
more rows: a loop of F.linear over their rows; otherwise one padded grid, two `bmm`s (fewer calls). Both give
a row the same bits (`tests/test_engine.py`), so the choice, which follows the batch, keeps invariance.
A token sums its K expert outputs in the fixed order k = 0..K-1. Optional expert biases b13 (E, 2F), b2 (E, D) and the
activation (moe/activation.py) are row-local, so invariance holds with them.

Legend: T tokens, D model dim, F expert dim, E experts, K experts per token, P pairs, R rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..numerics import Numerics, round_up
from .activation import SWIGLU
from .weights import dense


def experts_invariant(x_TD, w13, w2, expert_idx_TK, gates_TK, numerics: Numerics, b13_E2F=None, b2_ED=None,
                      act=SWIGLU) -> torch.Tensor:
    T, K = expert_idx_TK.shape
    E, D, q = w13.shape[0], x_TD.shape[1], numerics.row_quantum
    dtype = x_TD.dtype
    if T == 0:
        return x_TD.new_zeros(0, D)
    expert_P = expert_idx_TK.reshape(-1)  # token-major pairs: pair p = t*K + k
    gates_P = gates_TK.reshape(-1).to(dtype)
    order_P = torch.argsort(expert_P, stable=True)
    counts = torch.bincount(expert_P, minlength=E).tolist()
    x_ext_TD = F.pad(x_TD, (0, 0, 0, 1))  # row T is zeros: the padding rows gather it
    gates_ext_P = F.pad(gates_P, (0, 1))
    b13_E2F = None if b13_E2F is None else b13_E2F.to(dtype)
    b2_ED = None if b2_ED is None else b2_ED.to(dtype)
    pad_pair = T * K
    y_PD = x_TD.new_empty(T * K, D)
    block = round_up(max(counts), q)
    # the grid pads every expert to the busiest one's rows: taken where that wastes little (a quarter at most)
    if 2 * sum(c > 0 for c in counts) > E and 4 * E * block <= 5 * sum(round_up(c, q) for c in counts):
        counts_E = torch.tensor(counts, device=x_TD.device)
        expert_sorted_P = expert_P.index_select(0, order_P)
        rank_P = torch.arange(T * K, device=x_TD.device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_sorted_P]
        slot_P = expert_sorted_P * block + rank_P
        pair_R = torch.full((E * block,), pad_pair, dtype=torch.long, device=x_TD.device)
        pair_R[slot_P] = order_P
        tok_R = torch.where(pair_R == pad_pair, T, pair_R // K)
        x_EBD = x_ext_TD.index_select(0, tok_R).view(E, block, D)
        h_EB2F = torch.bmm(x_EBD, dense(w13, dtype=dtype).transpose(1, 2))
        if b13_E2F is not None:
            h_EB2F += b13_E2F[:, None, :]
        g_EB1 = gates_ext_P.index_select(0, pair_R).view(E, block, 1)
        y_EBD = torch.bmm(act(h_EB2F, numerics) * g_EB1, dense(w2, dtype=dtype).transpose(1, 2))
        if b2_ED is not None:
            y_EBD.addcmul_(b2_ED[:, None, :], g_EB1)
        y_RD = y_EBD.view(E * block, D)
        y_PD.index_copy_(0, order_P, y_RD.index_select(0, slot_P))
    else:
        offset = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            pairs_c = order_P[offset:offset + c]
            offset += c
            c_pad = round_up(c, q)
            pairs_r = F.pad(pairs_c, (0, c_pad - c), value=pad_pair) if c_pad != c else pairs_c
            tok_r = torch.where(pairs_r == pad_pair, T, pairs_r // K)
            g_r1 = gates_ext_P.index_select(0, pairs_r)[:, None]
            h_r2F = F.linear(x_ext_TD.index_select(0, tok_r), dense(w13, e, dtype))
            if b13_E2F is not None:  # added after the GEMM, as in the grid path (same bits)
                h_r2F += b13_E2F[e]
            y_rD = F.linear(act(h_r2F, numerics) * g_r1, dense(w2, e, dtype))
            if b2_ED is not None:
                y_rD.addcmul_(b2_ED[e], g_r1)
            y_PD.index_copy_(0, pairs_c, y_rD[:c])
    y_TKD = y_PD.view(T, K, D)
    out_TD = y_TKD[:, 0].clone()
    for k in range(1, K):
        out_TD += y_TKD[:, k]
    return out_TD
