"""Gather-and-sum: each token's output is the sum of its pairs' rows.

    out[t] = sum over the pairs p of token t of Y[pos[p]]

`pos` lists, token by token (CSR: token t owns pos[ptr[t]:ptr[t+1]]), where each
pair's row sits in the expert-sorted order. Used for the forward output (Y' = S*Y
rows: the gate was folded into A', so the sum is unweighted) and for dX (dXg rows).

A separate kernel, as in SonicMoE (fusing the scatter into the down-projection
epilogue needs atomics or a second sort, and cost ~20% there on Hopper, as SonicMoE
reports; docs/formulas.md): each program reads one token's K rows for BLOCK_D columns
and writes the sum once, accumulated in float32, with no atomics (deterministic). A
token without pairs gets zeros. Any number of pairs per token (token rounding, expert
choice).

Legend: T tokens, D model dim, P pairs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import acc_type
from .configs import aggregate_configs


@triton.autotune(configs=aggregate_configs(), key=["D"])
@triton.jit
def gather_sum_kernel(
    y_ptr, out_ptr, ptr_ptr, pos_ptr,
    D,
    stride_yr, stride_yd,
    stride_ot, stride_od,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(ptr_ptr + t)
    end = tl.load(ptr_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for i in range(start, end):
        p = tl.load(pos_ptr + i).to(tl.int64)
        acc += tl.load(y_ptr + p * stride_yr + cols * stride_yd, mask=cmask, other=0.0).to(ACC)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + cols * stride_od, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def launch_gather_sum(y_PD, ptr_T1, pos_P, out_TD) -> None:
    T, D = out_TD.shape
    if T == 0 or D == 0:
        return

    def grid(meta):
        return (T, triton.cdiv(D, meta["BLOCK_D"]))

    gather_sum_kernel[grid](
        y_PD, out_TD, ptr_T1, pos_P,
        D,
        y_PD.stride(0), y_PD.stride(1),
        out_TD.stride(0), out_TD.stride(1),
        ACC=acc_type(out_TD.dtype),
    )
