"""Forward kernel 1: gathered up-projection with the SwiGLU epilogue.

For the row tile of sorted pairs r (expert e, token tok[r]):
    [G | U] = X[tok[r]] @ W13[e].T        (gather inside the loads: no gathered X in memory)
    H[r]  = [G | U]                       (P, 2F), kept for backward
    A'[r] = s[r] * silu(G) * U            (P, F), the gate folded in (F wide, not D)

A program computes BLOCK_N columns of G and the matching columns of U with two
float32 accumulators, so the epilogue has both halves of SwiGLU in registers.
A' is computed from the float32 accumulators (H is rounded to the storage dtype
on store). Folding the gate s into A' makes the down projection a plain grouped
GEMM and the aggregation an unweighted sum (grouped.py does the same).

Legend: T tokens, D model dim, F expert dim, E experts, P pairs sorted by expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, acc_type, block_e, dot_precision, expert_tile, mma
from .configs import up_swiglu_configs


@triton.autotune(configs=up_swiglu_configs(), key=["F", "D"])
@triton.jit
def up_swiglu_kernel(
    x_ptr, w13_ptr, gates_ptr, tok_ptr, offsets_ptr, h_ptr, a_ptr,
    E, F, D,
    stride_xt, stride_xd,
    stride_we, stride_wf, stride_wd,
    stride_hp, stride_hf,
    stride_ap, stride_af,
    BLOCK_E: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(F, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    expert, row0, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :] * stride_xd
    wg_ptrs = w13_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wf + ks[:, None] * stride_wd
    wu_ptrs = wg_ptrs + F * stride_wf
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        kmask = (k0 + ks) < D
        xt = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        wg = tl.load(wg_ptrs, mask=wmask, other=0.0)
        wu = tl.load(wu_ptrs, mask=wmask, other=0.0)
        acc_g = mma(xt, wg, acc_g, PRECISION, UPCAST)
        acc_u = mma(xt, wu, acc_u, PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xd
        wg_ptrs += BLOCK_K * stride_wd
        wu_ptrs += BLOCK_K * stride_wd

    gate = tl.load(gates_ptr + rows, mask=rmask, other=0.0).to(ACC)
    act = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u * gate[:, None]
    omask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    h_ptrs = h_ptr + rows64[:, None] * stride_hp + cols[None, :] * stride_hf
    tl.store(h_ptrs, acc_g.to(h_ptr.dtype.element_ty), mask=omask)
    tl.store(h_ptrs + F * stride_hf, acc_u.to(h_ptr.dtype.element_ty), mask=omask)
    a_ptrs = a_ptr + rows64[:, None] * stride_ap + cols[None, :] * stride_af
    tl.store(a_ptrs, act.to(a_ptr.dtype.element_ty), mask=omask)


def launch_up_swiglu(x_TD, w13_EFD, gates_P, tok_P, offsets_E1, h_P2F, a_PF) -> None:
    """Fill h_P2F and a_PF (preallocated); inputs already checked by the caller."""
    P, E, D = tok_P.numel(), w13_EFD.shape[0], x_TD.shape[1]
    F = w13_EFD.shape[1] // 2
    if P == 0 or F == 0:
        return
    if D == 0:  # no reduction: H = 0 and A' = silu(0) * 0 = 0
        h_P2F.zero_()
        a_PF.zero_()
        return

    def grid(meta):
        return ((triton.cdiv(P, meta["BLOCK_M"]) + E) * triton.cdiv(F, meta["BLOCK_N"]),)

    up_swiglu_kernel[grid](
        x_TD, w13_EFD, gates_P, tok_P, offsets_E1, h_P2F, a_PF,
        E, F, D,
        x_TD.stride(0), x_TD.stride(1),
        w13_EFD.stride(0), w13_EFD.stride(1), w13_EFD.stride(2),
        h_P2F.stride(0), h_P2F.stride(1),
        a_PF.stride(0), a_PF.stride(1),
        BLOCK_E=block_e(E), ACC=acc_type(x_TD.dtype), PRECISION=dot_precision(x_TD.dtype), UPCAST=INTERPRET,
    )
