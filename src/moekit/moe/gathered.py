"""Inference kernels for few tokens: each (token, expert) pair reads its expert's weights by
index instead of sorting pairs and looping over experts (gpt-fast style).

`experts_gathered` (eager, no autograd, P <= E): each pair against its expert through `gathered_matvec`
(moe/weights.py: moekit's C kernel on the CPU where usable, else the pairs' weights copied and a `bmm`).
`experts_static` (K experts per token, static shapes, no host syncs: the compiled decode step):
a multiply-and-reduce over the gathered weights that torch.compile fuses. With T*K > E and
`allow_dense`, every expert runs on every token, weighted by a (T, E) gate matrix; the engine
passes allow_dense=False, since that choice depends on the batch size.

Both take the optional expert biases b13 (E, 2F), b2 (E, D) and an activation (moe/activation.py);
`experts_static` also the numerics policy of its activation (numerics.py). `experts_static` with
allow_dense=False is also the path of weights that are `rowwise_only` (8-bit activations), for any T.

Legend: T tokens, D model dim, F expert dim, E experts, K experts per token, P pairs.
"""

from __future__ import annotations

import torch

from ..numerics import PLAIN, Numerics
from .activation import SWIGLU
from .weights import dense, gathered_matvec


def use_gathered(num_pairs: int, num_experts: int) -> bool:
    return not torch.is_grad_enabled() and 0 < num_pairs <= num_experts


@torch.no_grad()
def experts_gathered(x_TD, w13, w2, gates_P, token_idx_P, expert_idx_P, b13_E2F=None, b2_ED=None,
                     act=SWIGLU) -> torch.Tensor:
    dtype = x_TD.dtype
    gates_P1 = gates_P.to(dtype)[:, None]
    h_P2F = gathered_matvec(w13, expert_idx_P, x_TD.index_select(0, token_idx_P).unsqueeze(1))
    if b13_E2F is not None:
        h_P2F += b13_E2F.to(dtype).index_select(0, expert_idx_P)
    y_PD = gathered_matvec(w2, expert_idx_P, (act(h_P2F) * gates_P1).unsqueeze(1))
    if b2_ED is not None:
        y_PD.addcmul_(b2_ED.to(dtype).index_select(0, expert_idx_P), gates_P1)
    return torch.zeros_like(x_TD).index_add_(0, token_idx_P, y_PD)


def experts_static(x_TD, w13, w2, gates_TK, expert_idx_TK, allow_dense: bool = True, b13_E2F=None, b2_ED=None,
                   act=SWIGLU, numerics: Numerics = PLAIN) -> torch.Tensor:
    T, K = expert_idx_TK.shape
    E = w13.shape[0]
    dtype = x_TD.dtype
    gates_TK = gates_TK.to(dtype)
    if not allow_dense or T * K <= E:  # (this order: no guard on T when dense is not allowed)
        expert_idx_P = expert_idx_TK.reshape(-1)
        gates_P1 = gates_TK.reshape(-1, 1)
        x_P1D = x_TD[:, None].expand(T, K, x_TD.shape[-1]).reshape(T * K, 1, -1)
        h_P2F = gathered_matvec(w13, expert_idx_P, x_P1D, numerics.batch_invariant)
        if b13_E2F is not None:
            h_P2F = h_P2F + b13_E2F.to(dtype)[expert_idx_P]
        a_P1F = (act(h_P2F, numerics) * gates_P1).unsqueeze(1)
        y_PD = gathered_matvec(w2, expert_idx_P, a_P1F, numerics.batch_invariant)
        if b2_ED is not None:
            y_PD = y_PD + b2_ED.to(dtype)[expert_idx_P] * gates_P1
        y_TKD = y_PD.view(T, K, -1)
        out_TD = y_TKD[:, 0]
        for k in range(1, K):  # a fixed order, k = 0..K-1
            out_TD = out_TD + y_TKD[:, k]
        return out_TD
    w13_EFD, w2_EDF = dense(w13, dtype=dtype), dense(w2, dtype=dtype)
    gates_ET = torch.zeros(T, E, dtype=dtype, device=x_TD.device).scatter(1, expert_idx_TK, gates_TK).t()
    h_ET2F = torch.matmul(x_TD, w13_EFD.transpose(1, 2))
    if b13_E2F is not None:
        h_ET2F = h_ET2F + b13_E2F.to(dtype)[:, None, :]
    a_ETF = act(h_ET2F) * gates_ET[..., None]
    y_ETD = torch.matmul(a_ETF, w2_EDF.transpose(1, 2))
    if b2_ED is not None:
        y_ETD = y_ETD + b2_ED.to(dtype)[:, None, :] * gates_ET[..., None]
    return y_ETD.sum(0)
