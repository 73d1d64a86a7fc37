"""Grouped (varlen-M) matrix multiplies over rows sorted by expert, in plain PyTorch.

Rows of `a` are sorted by expert; `offsets` holds E+1 row boundaries, so expert
e owns rows offsets[e]:offsets[e+1]. Three products cover forward and backward:

    gmm(a, w, offs)          out[rows_e] = a[rows_e] @ w[e].T      (w: E, N, K)
    gmm(a, w, offs, True)    out[rows_e] = a[rows_e] @ w[e]        (w: E, K, N)
    gmm_wgrad(a, b, offs)    out[e]      = a[rows_e].T @ b[rows_e] (E, Ka, Kb)

The implementation loops over experts with `out=` slices: no padding, no copies,
and empty experts cost nothing. (torch._grouped_mm exists on CPU too, but was
slower than this loop on the benchmark shapes here; see benchmarks/results.)

Legend: R rows (token-expert pairs), E experts, K/N matrix dims.
"""

from __future__ import annotations

from typing import List

import torch


def gmm(a_RK: torch.Tensor, w_ENK: torch.Tensor, offsets: List[int], w_transposed: bool = False) -> torch.Tensor:
    E = w_ENK.shape[0]
    N = w_ENK.shape[2] if w_transposed else w_ENK.shape[1]
    out_RN = a_RK.new_empty(a_RK.shape[0], N)
    for e in range(E):
        start, end = offsets[e], offsets[e + 1]
        if end == start:
            continue
        w = w_ENK[e] if w_transposed else w_ENK[e].t()
        torch.mm(a_RK[start:end], w, out=out_RN[start:end])
    return out_RN


def gmm_wgrad(a_RK: torch.Tensor, b_RN: torch.Tensor, offsets: List[int], num_experts: int) -> torch.Tensor:
    out_EKN = a_RK.new_empty(num_experts, a_RK.shape[1], b_RN.shape[1])
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if end == start:
            out_EKN[e].zero_()
            continue
        torch.mm(a_RK[start:end].t(), b_RN[start:end], out=out_EKN[e])
    return out_EKN
