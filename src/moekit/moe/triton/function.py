"""Layer 4: the autograd.Function of the Triton experts, and the backend entry point.

Forward (pairs sorted by expert once, in routing.routing_metadata):
    H, A' = up_proj_swiglu(X, W13, S)     X gathered inside the kernel; A' = S * silu(G) * U
    Y'    = grouped_mm(A', W2.T)          (P, D) temporary; Y' = S * Y
    out   = gather_sum(Y')                each token sums its pairs' rows

Saved for backward: X, H, the sorted gates S and integer metadata (tok, offsets,
token CSR). Never saved: the gathered X, A', Y'. Backward:
    dH, A', dS = swiglu_dh(dO, W2, H, S)  dO gathered inside; dS = <dA', A>, A' = S*A
    dW2  = grouped_wgrad(dO[tok], A')     varlen-K, dO gathered inside
    dW13 = grouped_wgrad(dH, X[tok])      varlen-K, X gathered inside
    dX   = gather_sum(grouped_mm(dH, W13))

`setup_context` style (forward takes no ctx), so the Function composes with the
custom ops under torch.compile. H leaves forward as a second, non-differentiable
output so setup_context can save it; `experts_triton` drops it.

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import SUPPORTED_DTYPES
from .ops import check_device, check_float, check_shape, gather_sum, grouped_mm, grouped_wgrad, swiglu_dh, up_proj_swiglu
from .routing import routing_metadata


class TritonExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(x_TD, w13_EFD, w2_EDF, gates_P, tok_P, offsets_E1, ptr_T1, pos_P):
        h_P2F, a_PF = up_proj_swiglu(x_TD, w13_EFD, gates_P, tok_P, offsets_E1)
        y_PD = grouped_mm(a_PF, w2_EDF, offsets_E1, transpose=True)
        del a_PF
        return gather_sum(y_PD, ptr_T1, pos_P), h_P2F

    @staticmethod
    def setup_context(ctx, inputs, output):
        x_TD, w13_EFD, w2_EDF, gates_P, tok_P, offsets_E1, ptr_T1, pos_P = inputs
        _, h_P2F = output
        ctx.mark_non_differentiable(h_P2F)
        ctx.set_materialize_grads(False)  # no zero (P, 2F) gradient for H in backward
        ctx.save_for_backward(x_TD, w13_EFD, w2_EDF, gates_P, tok_P, offsets_E1, ptr_T1, pos_P, h_P2F)

    @staticmethod
    def backward(ctx, dout_TD, _dh):
        if dout_TD is None:
            return (None,) * 8
        x_TD, w13_EFD, w2_EDF, gates_P, tok_P, offsets_E1, ptr_T1, pos_P, h_P2F = ctx.saved_tensors
        need_x, need_w13, need_w2, need_gates = ctx.needs_input_grad[:4]
        dout_TD = dout_TD.contiguous()
        dh_P2F, a_PF, ds_P = swiglu_dh(dout_TD, w2_EDF, h_P2F, gates_P, tok_P, offsets_E1)
        dw2 = grouped_wgrad(dout_TD, a_PF, tok_P, offsets_E1, gather_a=True) if need_w2 else None
        del a_PF
        dw13 = grouped_wgrad(dh_P2F, x_TD, tok_P, offsets_E1, gather_b=True) if need_w13 else None
        dx = gather_sum(grouped_mm(dh_P2F, w13_EFD, offsets_E1, transpose=False), ptr_T1, pos_P) if need_x else None
        return dx, dw13, dw2, (ds_P if need_gates else None), None, None, None, None


def check_inputs(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P) -> None:
    """ValueError naming the offending value for any shape/dtype/device mismatch."""
    check_device(x=x_TD, w13=w13_EFD, w2=w2_EDF, gates=gates_P, token_idx=token_idx_P, expert_idx=expert_idx_P)
    check_shape("x", x_TD, (None, None))
    T, D = x_TD.shape
    check_float("x", x_TD)
    check_float("w13", w13_EFD, x_TD.dtype)
    check_float("w2", w2_EDF, x_TD.dtype)
    check_shape("w13", w13_EFD, (None, None, D))
    E, F2, _ = w13_EFD.shape
    if F2 % 2:
        raise ValueError(f"w13 must be (E, 2*d_expert, d_model) with an even middle dim, got {tuple(w13_EFD.shape)}")
    check_shape("w2", w2_EDF, (E, D, F2 // 2))
    check_shape("token_idx", token_idx_P, (None,))
    P = token_idx_P.shape[0]
    check_shape("expert_idx", expert_idx_P, (P,))
    check_shape("gates", gates_P, (P,))
    for name, t in (("token_idx", token_idx_P), ("expert_idx", expert_idx_P)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if not gates_P.is_floating_point() or gates_P.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"gates must be a float tensor ({[str(d) for d in SUPPORTED_DTYPES]}), got {gates_P.dtype}")
    if P >= 2**31 or T >= 2**31:
        raise ValueError(f"too many pairs or tokens for int32 routing metadata: P={P}, T={T}")


def experts_triton(x_TD: Tensor, w13_EFD: Tensor, w2_EDF: Tensor, gates_P: Tensor, token_idx_P: Tensor,
                   expert_idx_P: Tensor) -> Tensor:
    """Routed experts on Triton kernels: sum over pairs p of gates[p] * W2[e] @ swiglu(W13[e] @ x[t]).

    Indices must lie in range (tokens < T, experts < E): not checked, that would need a host sync."""
    check_inputs(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P)
    meta = routing_metadata(token_idx_P, expert_idx_P, x_TD.shape[0], w13_EFD.shape[0])
    gates_sorted_P = gates_P[meta.order_P]  # autograd scatters dS back to the pairs' order
    out_TD, _ = TritonExpertsFunction.apply(
        x_TD, w13_EFD, w2_EDF, gates_sorted_P, meta.tok_P, meta.offsets_E1, meta.ptr_T1, meta.pos_P
    )
    return out_TD
