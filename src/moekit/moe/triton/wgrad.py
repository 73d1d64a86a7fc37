"""Varlen-K grouped GEMM: per-expert weight gradients, summing over the expert's rows.

    C[e] = A[rows of e].T @ B[rows of e]        (M, N) per expert, rows [offsets[e], offsets[e+1])

Either operand may be gathered by token index inside the loads:
    dW2[e]  = dO[tok].T @ A'        A gathered (dO, T x D), B = A' (P x F)     -> (E, D, F)
    dW13[e] = dH.T @ X[tok]         A = dH (P x 2F), B gathered (X, T x D)     -> (E, 2F, D)
One program owns one (BLOCK_M, BLOCK_N) tile of one expert and walks all its rows
in BLOCK_K chunks: no split-K, so the sum order is fixed (deterministic), and an
expert without rows writes zeros.

Legend: P pairs sorted by expert, E experts, M/N output dims.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, acc_type, dot_precision, mma
from .configs import wgrad_configs


@triton.autotune(configs=wgrad_configs(), key=["M", "N"])
@triton.jit
def wgrad_kernel(
    a_ptr, b_ptr, c_ptr, tok_ptr, offsets_ptr,
    M, N,
    stride_ar, stride_am,
    stride_br, stride_bn,
    stride_ce, stride_cm, stride_cn,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    expert = pid // (num_m * num_n)
    tile = pid % (num_m * num_n)
    pid_m = tile // num_n
    pid_n = tile % num_n
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    ks = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + ks
        rmask = rows < end
        ra = rows.to(tl.int64)
        rb = rows.to(tl.int64)
        if GATHER_A:
            ra = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        if GATHER_B:
            rb = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        a = tl.load(a_ptr + ra[None, :] * stride_ar + offs_m[:, None] * stride_am,
                    mask=mmask[:, None] & rmask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K) = A.T tile
        b = tl.load(b_ptr + rb[:, None] * stride_br + offs_n[None, :] * stride_bn,
                    mask=rmask[:, None] & nmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = mma(a, b, acc, PRECISION, UPCAST)

    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def launch_wgrad(a_RM, b_RN, tok_P, offsets_E1, c_EMN, gather_a: bool, gather_b: bool) -> None:
    """c_EMN[e] = a[rows of e].T @ b[rows of e], rows gathered through tok_P where asked."""
    E, M, N = c_EMN.shape
    if E == 0 or M == 0 or N == 0:
        return

    def grid(meta):
        return (E * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    wgrad_kernel[grid](
        a_RM, b_RN, c_EMN, tok_P, offsets_E1,
        M, N,
        a_RM.stride(0), a_RM.stride(1),
        b_RN.stride(0), b_RN.stride(1),
        c_EMN.stride(0), c_EMN.stride(1), c_EMN.stride(2),
        GATHER_A=gather_a, GATHER_B=gather_b,
        ACC=acc_type(c_EMN.dtype), PRECISION=dot_precision(c_EMN.dtype), UPCAST=INTERPRET,
    )
