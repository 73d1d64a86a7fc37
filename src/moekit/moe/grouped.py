"""Memory-efficient expert computation (SonicMoE's caching policy) in plain PyTorch.

Forward, with the (token, expert) pairs sorted by expert once:
    Xg = X[tok]                      gathered rows, a temporary
    H  = Xg @ W13[e].T  per expert   (P, 2F)  -- saved
    A  = silu(G) * U                 (P, F)   -- temporary
    Y  = A @ W2[e].T    per expert   (P, D)   -- temporary
    out[t] = sum over t's pairs of S * Y

Saved for backward: X, H, the gates S and the integer sort (O(P) ints).
Never saved: Xg, A, Y. Backward recomputes A from H and gets dS without Y:
    dA' = dOg @ W2[e]        (gradient w.r.t. A' = S*A)
    dS  = <dA', A> row-wise
    dW2 = dOg.T @ A'         dA = S * dA'   dH = swiglu'(H) dA
    dW13 = dH.T @ Xg         dX[t] += dH @ W13[e]

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .gmm import gmm, gmm_wgrad


def sort_by_expert(token_idx_P: torch.Tensor, expert_idx_P: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Sort pairs by expert (stable). Returns (order_P, sorted token ids, E+1 row offsets)."""
    order_P = torch.argsort(expert_idx_P, stable=True)
    counts_E = torch.bincount(expert_idx_P, minlength=num_experts)
    offsets = [0] + torch.cumsum(counts_E, 0).tolist()
    return order_P, token_idx_P[order_P], offsets


def swiglu(h_P2F: torch.Tensor) -> torch.Tensor:
    n = h_P2F.shape[1] // 2
    return F.silu(h_P2F[:, :n]) * h_P2F[:, n:]


def swiglu_backward(h_P2F: torch.Tensor, da_PF: torch.Tensor) -> torch.Tensor:
    """dH for A = silu(G) * U, computed in float32 (float64 stays float64)."""
    n = h_P2F.shape[1] // 2
    work = torch.float64 if h_P2F.dtype == torch.float64 else torch.float32
    g, u, da = h_P2F[:, :n].to(work), h_P2F[:, n:].to(work), da_PF.to(work)
    sig = torch.sigmoid(g)
    silu = g * sig
    dh_P2F = torch.empty_like(h_P2F)
    dh_P2F[:, :n] = da * u * (sig * (1 + g * (1 - sig)))
    dh_P2F[:, n:] = da * silu
    return dh_P2F


class GroupedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P):
        E = w13_EFD.shape[0]
        order_P, tok_P, offsets = sort_by_expert(token_idx_P, expert_idx_P, E)
        gates_sorted_P = gates_P[order_P].to(x_TD.dtype)
        h_P2F = gmm(x_TD.index_select(0, tok_P), w13_EFD, offsets)
        y_PD = gmm(swiglu(h_P2F), w2_EDF, offsets)
        y_PD.mul_(gates_sorted_P[:, None])
        out_TD = torch.zeros_like(x_TD).index_add_(0, tok_P, y_PD)
        ctx.save_for_backward(x_TD, w13_EFD, w2_EDF, gates_sorted_P, h_P2F, order_P, tok_P)
        ctx.offsets = offsets
        ctx.gates_dtype = gates_P.dtype
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, w13_EFD, w2_EDF, gates_sorted_P, h_P2F, order_P, tok_P = ctx.saved_tensors
        offsets, E = ctx.offsets, w13_EFD.shape[0]
        need_x, need_w13, need_w2, need_gates = ctx.needs_input_grad[:4]
        dout_TD = dout_TD.contiguous()
        dog_PD = dout_TD.index_select(0, tok_P)
        a_PF = swiglu(h_P2F)
        da_scaled_PF = gmm(dog_PD, w2_EDF, offsets, w_transposed=True)  # dA' = dOg @ W2[e]

        dgates_P = None
        if need_gates:
            dgates_sorted_P = (da_scaled_PF * a_PF).sum(dim=-1, dtype=torch.float32 if a_PF.dtype != torch.float64 else None)
            dgates_P = torch.empty_like(dgates_sorted_P, dtype=ctx.gates_dtype)
            dgates_P[order_P] = dgates_sorted_P.to(ctx.gates_dtype)

        dw2 = None
        if need_w2:
            a_PF.mul_(gates_sorted_P[:, None])  # A' = S * A, in place
            dw2 = gmm_wgrad(dog_PD, a_PF, offsets, E)
        del a_PF, dog_PD

        dx = dw13 = None
        if need_x or need_w13:
            dh_P2F = swiglu_backward(h_P2F, da_scaled_PF.mul_(gates_sorted_P[:, None]))  # dA = S * dA'
            del da_scaled_PF
            if need_w13:
                dw13 = gmm_wgrad(dh_P2F, x_TD.index_select(0, tok_P), offsets, E)
            if need_x:
                dxg_PD = gmm(dh_P2F, w13_EFD, offsets, w_transposed=True)
                dx = torch.zeros_like(x_TD).index_add_(0, tok_P, dxg_PD)
        return dx, dw13, dw2, dgates_P, None, None


def experts_grouped(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P) -> torch.Tensor:
    return GroupedExpertsFunction.apply(x_TD.contiguous(), w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P)
