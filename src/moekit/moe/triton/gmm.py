"""Varlen-M grouped GEMM over rows sorted by expert (forward down projection, backward dX).

    C[r, :] = A[r, :] @ B[e]          for every row r of expert e (rows [offsets[e], offsets[e+1]))

B[e] is read through strides as a (K, N) matrix, so a weight stored (N, K) is used
transposed without a copy:
    down projection  Y'[r] = A'[r] @ W2[e].T     B[e] = W2[e].T: (F, D)
    backward dX      dXg[r] = dH[r] @ W13[e]     B[e] = W13[e]:  (2F, D)
The row tiles follow the tile-aligned schedule of common.expert_tile.

Legend: P pairs sorted by expert, E experts, K reduction dim, N output dim.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, acc_type, block_e, dot_precision, expert_tile, mma
from .configs import gmm_configs


@triton.autotune(configs=gmm_configs(), key=["N", "K"])
@triton.jit
def gmm_kernel(
    a_ptr, b_ptr, c_ptr, offsets_ptr,
    E, N, K,
    stride_ar, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cr, stride_cn,
    BLOCK_E: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    expert, row0, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + rows[:, None] * stride_ar + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rows[:, None] * stride_cr + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def launch_gmm(a_PK, b_EKN, offsets_E1, c_PN) -> None:
    """c_PN[rows of e] = a_PK[rows of e] @ b_EKN[e]; b_EKN may be any strided (E, K, N) view."""
    P, K = a_PK.shape
    E, N = b_EKN.shape[0], b_EKN.shape[2]
    if P == 0 or N == 0:
        return
    if K == 0:
        c_PN.zero_()
        return

    def grid(meta):
        return ((triton.cdiv(P, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    gmm_kernel[grid](
        a_PK, b_EKN, c_PN, offsets_E1,
        E, N, K,
        a_PK.stride(0), a_PK.stride(1),
        b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2),
        c_PN.stride(0), c_PN.stride(1),
        BLOCK_E=block_e(E), ACC=acc_type(a_PK.dtype), PRECISION=dot_precision(a_PK.dtype), UPCAST=INTERPRET,
    )
