"""Backward kernel: dH from dO gathered by index, with dS and A' in the epilogue.

For the row tile of sorted pairs r (expert e, token tok[r], gate s[r]):
    dA'[r] = dO[tok[r]] @ W2[e]              (gather inside the loads: no gathered dO in memory)
    G, U   = H[r, :F], H[r, F:]              (reloaded: the only saved activation)
    A      = silu(G) * U                     (recomputed, never saved)
    dS[r]  = <dA'[r], A>                     (row-wise, over all F columns)
    A'[r]  = s[r] * A                        (written for dW2 = dOg.T @ A')
    dA     = s[r] * dA'
    dH[r]  = [dA * U * silu'(G) | dA * silu(G)]

A program owns BLOCK_M rows and loops over all F columns in BLOCK_N chunks (each a
full reduction over D), so dS is complete in registers: deterministic, with no
partial sums or atomics, whatever BLOCK_N the autotuner picks.

Legend: T tokens, D model dim, F expert dim, E experts, P pairs sorted by expert.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import INTERPRET, acc_type, block_e, dot_precision, expert_tile, mma
from .configs import dh_configs


@triton.autotune(configs=dh_configs(), key=["F", "D"])
@triton.jit
def dh_kernel(
    dout_ptr, w2_ptr, h_ptr, gates_ptr, tok_ptr, offsets_ptr, dh_ptr, a_ptr, ds_ptr,
    E, F, D,
    stride_ot, stride_od,
    stride_we, stride_wd, stride_wf,
    stride_hp, stride_hf,
    stride_dhp, stride_dhf,
    stride_ap, stride_af,
    BLOCK_E: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert, row0, row_end = expert_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    tok = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    gate = tl.load(gates_ptr + rows, mask=rmask, other=0.0).to(ACC)
    ks = tl.arange(0, BLOCK_K)
    w_base = w2_ptr + expert.to(tl.int64) * stride_we
    ds = tl.zeros((BLOCK_M,), dtype=ACC)

    for n0 in range(0, F, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < F
        o_ptrs = dout_ptr + tok[:, None] * stride_ot + ks[None, :] * stride_od
        w_ptrs = w_base + ks[:, None] * stride_wd + cols[None, :] * stride_wf
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)  # dA'
        for k0 in range(0, D, BLOCK_K):
            kmask = (k0 + ks) < D
            o = tl.load(o_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = mma(o, w, acc, PRECISION, UPCAST)
            o_ptrs += BLOCK_K * stride_od
            w_ptrs += BLOCK_K * stride_wd

        omask = rmask[:, None] & cmask[None, :]
        h_ptrs = h_ptr + rows64[:, None] * stride_hp + cols[None, :] * stride_hf
        g = tl.load(h_ptrs, mask=omask, other=0.0).to(ACC)
        u = tl.load(h_ptrs + F * stride_hf, mask=omask, other=0.0).to(ACC)
        sig = 1.0 / (1.0 + tl.exp(-g))
        silu = g * sig
        act = silu * u
        ds += tl.sum(acc * act, axis=1)
        da = acc * gate[:, None]
        dg = da * u * sig * (1.0 + g * (1.0 - sig))
        du = da * silu
        dh_ptrs = dh_ptr + rows64[:, None] * stride_dhp + cols[None, :] * stride_dhf
        tl.store(dh_ptrs, dg.to(dh_ptr.dtype.element_ty), mask=omask)
        tl.store(dh_ptrs + F * stride_dhf, du.to(dh_ptr.dtype.element_ty), mask=omask)
        a_ptrs = a_ptr + rows64[:, None] * stride_ap + cols[None, :] * stride_af
        tl.store(a_ptrs, (act * gate[:, None]).to(a_ptr.dtype.element_ty), mask=omask)

    tl.store(ds_ptr + rows64, ds.to(ds_ptr.dtype.element_ty), mask=rmask)


def launch_dh(dout_TD, w2_EDF, h_P2F, gates_P, tok_P, offsets_E1, dh_P2F, a_PF, ds_P) -> None:
    """Fill dh_P2F, a_PF (A' = s*A) and ds_P (preallocated); inputs already checked."""
    P, E, D = tok_P.numel(), w2_EDF.shape[0], w2_EDF.shape[1]
    F = w2_EDF.shape[2]
    if P == 0:
        return
    if F == 0:
        ds_P.zero_()
        return

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_M"]) + E,)

    dh_kernel[grid](
        dout_TD, w2_EDF, h_P2F, gates_P, tok_P, offsets_E1, dh_P2F, a_PF, ds_P,
        E, F, D,
        dout_TD.stride(0), dout_TD.stride(1),
        w2_EDF.stride(0), w2_EDF.stride(1), w2_EDF.stride(2),
        h_P2F.stride(0), h_P2F.stride(1),
        dh_P2F.stride(0), dh_P2F.stride(1),
        a_PF.stride(0), a_PF.stride(1),
        BLOCK_E=block_e(E), ACC=acc_type(h_P2F.dtype), PRECISION=dot_precision(h_P2F.dtype), UPCAST=INTERPRET,
    )
