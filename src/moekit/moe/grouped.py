"""Memory-efficient expert computation (SonicMoE's caching policy) in plain PyTorch.

Forward: H = X[tok] @ W13[e].T (+ b13[e]) (P, 2F), A' = S * act(H) (P, F), out = sum of
A' @ W2[e].T (+ S * b2[e]) per token. Saved for backward: X, H, the sorted gates S and the
integer sort (O(P) ints), and the bias parameters; never the gathered X, A or Y. Backward
recomputes A from H and gets dS = <dA', A> (+ <dO[tok], b2[e]>) without Y; db13[e] sums dH and
db2[e] sums S * dO[tok] over the expert's pairs. `act` is a moe/activation.py activation. The
contract and the backward formulas: docs/architecture.md ("Memory contract").

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs, R rows of the
layout (gmm.ExpertRows).
"""

from __future__ import annotations

import torch

from .activation import SWIGLU
from .gmm import ExpertRows, choose_block


def expert_sums(v_RN: torch.Tensor, expert_R: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-expert sum of rows (a bias gradient); padding rows are zero, whatever expert they name."""
    return v_RN.new_zeros(num_experts, v_RN.shape[1]).index_add_(0, expert_R, v_RN)


class GroupedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, layout="auto", b13_E2F=None,
                b2_ED=None, act=SWIGLU, gemm=None):
        T, E = x_TD.shape[0], w13_EFD.shape[0]
        order_P = torch.argsort(expert_idx_P, stable=True)  # pairs sorted by expert, once
        tok_P, counts_E = token_idx_P[order_P], torch.bincount(expert_idx_P, minlength=E)
        block = choose_block(counts_E, x_TD.device, layout)
        rows = ExpertRows(tok_P, counts_E, T, block, gemm)
        gates_sorted_P = gates_P[order_P].to(x_TD.dtype)

        s_R1 = rows.to_rows(gates_sorted_P)[:, None]
        # each row's expert (padding rows: expert 0, with gate 0 and a zero dO row)
        expert_R = rows.to_rows(expert_idx_P[order_P]) if b13_E2F is not None or b2_ED is not None else None

        h_R2F = rows.mm(rows.gather(x_TD), w13_EFD)
        if b13_E2F is not None:
            h_R2F.add_(b13_E2F.index_select(0, expert_R))
        a_scaled_RF = act(h_R2F).mul_(s_R1)  # A' = S*A (F wide, not D)
        y_RD = rows.mm(a_scaled_RF, w2_EDF)
        del a_scaled_RF
        if b2_ED is not None:
            y_RD.addcmul_(b2_ED.index_select(0, expert_R), s_R1)  # + S * b2[e]
        out_TD = rows.scatter_add(y_RD)  # sum over pairs of S*Y
        del y_RD
        ctx.save_for_backward(x_TD, w13_EFD, w2_EDF, gates_sorted_P, rows.to_pairs(h_R2F), order_P, tok_P, counts_E,
                              b13_E2F, b2_ED)
        ctx.block, ctx.act, ctx.gemm = block, act, gemm
        ctx.gates_dtype = gates_P.dtype
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, w13_EFD, w2_EDF, gates_sorted_P, h_P2F, order_P, tok_P, counts_E, b13_E2F, b2_ED = ctx.saved_tensors
        need_x, need_w13, need_w2, need_gates = ctx.needs_input_grad[:4]
        need_b13, need_b2 = ctx.needs_input_grad[7:9]
        E, P = counts_E.numel(), tok_P.numel()
        rows = ExpertRows(tok_P, counts_E, x_TD.shape[0], ctx.block, ctx.gemm)
        h_R2F = rows.to_rows(h_P2F)
        s_R1 = rows.to_rows(gates_sorted_P)[:, None]
        expert_R = None
        if b13_E2F is not None or b2_ED is not None:  # recomputed from the counts (not saved)
            expert_R = rows.to_rows(torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E,
                                                            output_size=P))

        dog_RD = rows.gather(dout_TD.contiguous())
        a_RF = ctx.act(h_R2F)  # recomputed from H
        da_scaled_RF = rows.mm(dog_RD, w2_EDF, w_transposed=True)  # dA' = dOg @ W2[e]

        dgates_P = None
        if need_gates:  # dS = <dA', A> (+ <dOg, b2[e]>)
            ds_R = torch.linalg.vecdot(da_scaled_RF, a_RF)
            if b2_ED is not None:
                ds_R += torch.linalg.vecdot(dog_RD, b2_ED.index_select(0, expert_R))
            dgates_P = torch.empty(order_P.shape[0], dtype=ctx.gates_dtype, device=dout_TD.device)
            dgates_P[order_P] = rows.to_pairs(ds_R).to(ctx.gates_dtype)

        dw2 = rows.wgrad(dog_RD, a_RF.mul_(s_R1)) if need_w2 else None  # dW2 = dOg.T @ A'
        db2 = expert_sums(dog_RD * s_R1, expert_R, E) if need_b2 else None  # db2[e] = sum of S * dOg
        del a_RF, dog_RD

        dx = dw13 = db13 = None
        if need_x or need_w13 or need_b13:
            dh_R2F = ctx.act.backward(h_R2F, da_scaled_RF.mul_(s_R1))  # dA = S * dA'
            del da_scaled_RF, h_R2F
            if need_b13:
                db13 = expert_sums(dh_R2F, expert_R, E)
            if need_w13:
                dw13 = rows.wgrad(dh_R2F, rows.gather(x_TD))
            if need_x:
                dx = rows.scatter_add(rows.mm(dh_R2F, w13_EFD, w_transposed=True))
        return dx, dw13, dw2, dgates_P, None, None, None, db13, db2, None, None


def experts_grouped(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, layout: str = "auto",
                    b13_E2F=None, b2_ED=None, act=SWIGLU, gemm=None) -> torch.Tensor:
    """Routed experts with the memory-efficient backward.

    `layout`: 'auto', 'compact', 'padded' or an int grid block size (see gmm.ExpertRows).
    `b13_E2F`, `b2_ED`: optional expert biases, in x's dtype; `act`: a moe/activation.py activation;
    `gemm`: a low-precision recipe for every expert GEMM (moekit.lowp; see gmm.ExpertRows) or None."""
    return GroupedExpertsFunction.apply(x_TD.contiguous(), w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, layout,
                                        b13_E2F, b2_ED, act, gemm)
