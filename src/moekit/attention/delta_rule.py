"""The gated delta rule (Gated DeltaNet, Yang et al. 2024) with grouped value heads, in three forms
that take and return the recurrent state:

    o, S = delta_rule_reference(q, k, v, g, beta, S0)    per token, readable: the oracle
    o, S = delta_rule_chunked(q, k, v, g, beta, S0)      chunks of 64 tokens, matmuls (training, prefill)
    o, S = delta_rule_step(q, k, v, g, beta, S0)         one token, elementwise (decode)

Per value head, with its key head's q_t, k_t (already L2-normed; q already scaled) and
S the (Dk, Dv) state:

    S_t = exp(g_t) S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)
    o_t = S_t^T q_t

A token with g = 0 and beta = 0 leaves the state as it was (how padding is skipped).
Value head j reads key head j // R (R = Hv / Hk, transformers' repeat_interleave order).
Work is in float32 at least (float64 stays float64); outputs come back in v's dtype, the
state in the work dtype.

The chunked form, inside a chunk of C tokens with cumulative log decay c_i = g_1 + ... + g_i
and the state S0 before it (Γ_ij = exp(c_i - c_j) for j <= i, else 0):

    (I + A) U = beta V - diag(beta exp(c)) K S0,   A_ij = beta_i Γ_ij k_i.k_j  (j < i)
    O = diag(exp(c)) Q S0 + (Q K^T ⊙ Γ) U
    S_C = exp(c_C) S0 + (diag(exp(c_C - c)) K)^T U

so one unit-lower-triangular solve per chunk gives U = U0 - W S0 (U0, W independent of S0) and
only the (Dk, Dv) state passes from chunk to chunk.

Legend: B batch, Hk key heads, Hv value heads, T tokens, Dk key dim, Dv value dim, N chunks, C chunk.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

CHUNK = 64


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def expand_heads(x_BHkTD: torch.Tensor, Hv: int) -> torch.Tensor:
    """Key-head tensors repeated for their value heads (head j of the result is head j // R)."""
    Hk = x_BHkTD.shape[1]
    return x_BHkTD if Hk == Hv else x_BHkTD.repeat_interleave(Hv // Hk, dim=1)


def zero_state(B: int, Hv: int, Dk: int, Dv: int, dtype, device) -> torch.Tensor:
    return torch.zeros(B, Hv, Dk, Dv, dtype=work_dtype(dtype), device=device)


def delta_rule_reference(q_BHkTDk, k_BHkTDk, v_BHvTDv, g_BHvT, beta_BHvT,
                         state_BHvDkDv: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token: (o (B, Hv, T, Dv), final state (B, Hv, Dk, Dv))."""
    B, Hv, T, Dv = v_BHvTDv.shape
    wt = work_dtype(v_BHvTDv.dtype)
    q, k = (expand_heads(t, Hv).to(wt) for t in (q_BHkTDk, k_BHkTDk))
    v, g, beta = v_BHvTDv.to(wt), g_BHvT.to(wt), beta_BHvT.to(wt)
    S = zero_state(B, Hv, q.shape[-1], Dv, wt, v.device) if state_BHvDkDv is None else state_BHvDkDv.to(wt)
    outs = []
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        predicted_BHDv = torch.einsum("bhkv,bhk->bhv", S, k[:, :, t])
        u_BHDv = beta[:, :, t, None] * (v[:, :, t] - predicted_BHDv)
        S = S + k[:, :, t, :, None] * u_BHDv[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, Hv, 0, Dv)
    return o.to(v_BHvTDv.dtype), S


def delta_rule_step(q_BHkDk, k_BHkDk, v_BHvDv, g_BHv, beta_BHv, state_BHvDkDv,
                    ew: Callable = lambda fn, x: fn(x)) -> Tuple[torch.Tensor, torch.Tensor]:
    """One token per row: (o (B, Hv, Dv), new state). Elementwise products and sums only, so a row's
    bits do not depend on the batch size; `ew(fn, x)` applies the transcendental (numerics.ew)."""
    Hv = v_BHvDv.shape[1]
    wt = state_BHvDkDv.dtype
    q, k = (expand_heads(t[:, :, None], Hv)[:, :, 0].to(wt) for t in (q_BHkDk, k_BHkDk))
    S = state_BHvDkDv * ew(torch.exp, g_BHv.to(wt))[..., None, None]
    predicted_BHDv = (S * k[..., None]).sum(-2)
    u_BHDv = beta_BHv.to(wt)[..., None] * (v_BHvDv.to(wt) - predicted_BHDv)
    S = S + k[..., None] * u_BHDv[:, :, None, :]
    o_BHDv = (S * q[..., None]).sum(-2)
    return o_BHDv.to(v_BHvDv.dtype), S


def delta_rule_chunked(q_BHkTDk, k_BHkTDk, v_BHvTDv, g_BHvT, beta_BHvT,
                       state_BHvDkDv: Optional[torch.Tensor] = None, chunk: int = CHUNK
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same result as `delta_rule_reference`, a chunk of tokens at a time (any T; autograd)."""
    B, Hv, T, Dv = v_BHvTDv.shape
    wt = work_dtype(v_BHvTDv.dtype)
    q, k = (expand_heads(t, Hv).to(wt) for t in (q_BHkTDk, k_BHkTDk))
    v, g, beta = v_BHvTDv.to(wt), g_BHvT.to(wt), beta_BHvT.to(wt)
    Dk = q.shape[-1]
    S = zero_state(B, Hv, Dk, Dv, wt, v.device) if state_BHvDkDv is None else state_BHvDkDv.to(wt)
    if T == 0:
        return v_BHvTDv.new_zeros(B, Hv, 0, Dv), S
    C = min(chunk, T)
    pad = -T % C  # padding tokens: k = 0, beta = 0, g = 0 leave the state alone
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    N = (T + pad) // C
    q, k, v = (t.reshape(B, Hv, N, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, Hv, N, C), beta.reshape(B, Hv, N, C)

    # cumulative log decays in float64: c_i - c_j of two large fp32 sums would lose the digits of Γ
    c64_BHNC = g.double().cumsum(-1)
    lower_CC = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    diff_BHNCC = (c64_BHNC[..., :, None] - c64_BHNC[..., None, :]).masked_fill(~lower_CC, float("-inf"))
    decay_BHNCC = diff_BHNCC.exp().to(wt)  # Γ: exp(c_i - c_j) on and below the diagonal, 0 above
    c_BHNC = c64_BHNC.to(wt)
    kk_BHNCC = k @ k.transpose(-1, -2)
    A = (beta[..., None] * decay_BHNCC * kk_BHNCC).tril(-1)
    eye_CC = torch.eye(C, dtype=wt, device=v.device)
    system = A + eye_CC
    rhs = torch.cat([beta[..., None] * v, (beta * c_BHNC.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    U0_BHNCDv, W_BHNCDk = solved[..., :Dv], solved[..., Dv:]
    attn_BHNCC = (q @ k.transpose(-1, -2)) * decay_BHNCC
    q_decayed = q * c_BHNC.exp()[..., None]
    k_to_end = k * (c64_BHNC[..., -1:] - c64_BHNC).exp().to(wt)[..., None]
    chunk_decay_BHN = c_BHNC[..., -1].exp()

    outs = []
    for n in range(N):
        U = U0_BHNCDv[:, :, n] - W_BHNCDk[:, :, n] @ S
        outs.append(q_decayed[:, :, n] @ S + attn_BHNCC[:, :, n] @ U)
        S = chunk_decay_BHN[:, :, n, None, None] * S + k_to_end[:, :, n].transpose(-1, -2) @ U
    o = torch.cat(outs, dim=2)[:, :, :T]
    return o.to(v_BHvTDv.dtype), S
