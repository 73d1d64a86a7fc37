"""Memory-efficient expert computation (SonicMoE's caching policy) in plain PyTorch.

Forward: H = X[tok] @ W13[e].T (P, 2F), A' = S * swiglu(H) (P, F), out = sum of A' @ W2[e].T
per token. Saved for backward: X, H, the sorted gates S and the integer sort (O(P) ints); never
the gathered X, A or Y. Backward recomputes A from H and gets dS = <dA', A> without Y. The
contract and the backward formulas: docs/architecture.md ("Memory contract").

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs, R rows of the
layout (gmm.ExpertRows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ffn import swiglu
from .gmm import ExpertRows, choose_block


class GroupedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, layout="auto"):
        T, E = x_TD.shape[0], w13_EFD.shape[0]
        order_P = torch.argsort(expert_idx_P, stable=True)  # pairs sorted by expert, once
        tok_P, counts_E = token_idx_P[order_P], torch.bincount(expert_idx_P, minlength=E)
        block = choose_block(counts_E, x_TD.device, layout)
        rows = ExpertRows(tok_P, counts_E, T, block)
        gates_sorted_P = gates_P[order_P].to(x_TD.dtype)

        h_R2F = rows.mm(rows.gather(x_TD), w13_EFD)
        a_scaled_RF = swiglu(h_R2F).mul_(rows.to_rows(gates_sorted_P)[:, None])  # A' = S*A (F wide, not D)
        out_TD = rows.scatter_add(rows.mm(a_scaled_RF, w2_EDF))  # sum over pairs of S*Y
        del a_scaled_RF
        ctx.save_for_backward(x_TD, w13_EFD, w2_EDF, gates_sorted_P, rows.to_pairs(h_R2F), order_P, tok_P, counts_E)
        ctx.block = block
        ctx.gates_dtype = gates_P.dtype
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, w13_EFD, w2_EDF, gates_sorted_P, h_P2F, order_P, tok_P, counts_E = ctx.saved_tensors
        need_x, need_w13, need_w2, need_gates = ctx.needs_input_grad[:4]
        rows = ExpertRows(tok_P, counts_E, x_TD.shape[0], ctx.block)
        h_R2F = rows.to_rows(h_P2F)
        n = h_R2F.shape[1] // 2
        g_RF, u_RF = h_R2F[:, :n], h_R2F[:, n:]
        s_R1 = rows.to_rows(gates_sorted_P)[:, None]

        dog_RD = rows.gather(dout_TD.contiguous())
        silu_RF = F.silu(g_RF)
        a_RF = silu_RF * u_RF  # recomputed from H
        da_scaled_RF = rows.mm(dog_RD, w2_EDF, w_transposed=True)  # dA' = dOg @ W2[e]

        dgates_P = None
        if need_gates:  # dS = <dA', A>
            dgates_sorted_P = rows.to_pairs(torch.linalg.vecdot(da_scaled_RF, a_RF))
            dgates_P = torch.empty(order_P.shape[0], dtype=ctx.gates_dtype, device=dout_TD.device)
            dgates_P[order_P] = dgates_sorted_P.to(ctx.gates_dtype)

        dw2 = rows.wgrad(dog_RD, a_RF.mul_(s_R1)) if need_w2 else None  # dW2 = dOg.T @ A'
        del a_RF, dog_RD

        dx = dw13 = None
        if need_x or need_w13:
            da_RF = da_scaled_RF.mul_(s_R1)  # dA = S * dA'
            dh_R2F = torch.empty_like(h_R2F)
            torch.mul(da_RF, silu_RF, out=dh_R2F[:, n:])  # dU = dA * silu(G)
            dh_R2F[:, :n] = torch.ops.aten.silu_backward(da_RF.mul_(u_RF), g_RF)  # dG = silu'(G) * dA * U
            del da_RF, silu_RF, da_scaled_RF, h_R2F
            if need_w13:
                dw13 = rows.wgrad(dh_R2F, rows.gather(x_TD))
            if need_x:
                dx = rows.scatter_add(rows.mm(dh_R2F, w13_EFD, w_transposed=True))
        return dx, dw13, dw2, dgates_P, None, None, None


def experts_grouped(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, layout: str = "auto") -> torch.Tensor:
    """Routed experts with the memory-efficient backward.

    `layout`: 'auto', 'compact', 'padded' or an int grid block size (see gmm.ExpertRows)."""
    return GroupedExpertsFunction.apply(x_TD.contiguous(), w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, layout)
