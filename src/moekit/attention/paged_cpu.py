"""Decode attention read in place from a paged KV pool on CPU: the C kernel of cpu_attention.c (built
with cpu_matvec.c, by moekit/cpu_matvec.py) as the op `torch.ops.moekit.paged_decode_attention` (its CPU
kernel in C++, cpu_ops.cpp; `call` below is the Python one, the fallback).

The engine's decode step keeps keys and values in a block pool (engine/paged.py). The torch path
gathers every row's slots into a (B, G, S, Dh) copy before attending (8 MiB per layer at 64 rows of
128 slots); this one reads each key and value where it lies, through the row's slot table. Each
(row, head) is computed alone in a fixed order, so its bits never depend on the batch (the engine's
batch-invariant numerics hold with it; tests/test_paged_attention.py checks it against
`math_attention` on the gathered copy and alone against co-batched).

`PagedKV` is what a paged layer cache's `read_in_place` returns in place of the gathered (k, v), for an
attention kind that asks for it (`attend_spans(..., in_place=True)`: GQA); `usable` says when.

Legend: B rows, H query heads, G KV heads, S slots, N pool slots, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import cpu_matvec


@dataclass
class PagedKV:
    """A decode step's view of one layer: the pools (G, N, Dh) and each row's slot table (B, S)."""

    pool_k_GNDh: torch.Tensor
    pool_v_GNDh: torch.Tensor
    table_BS: torch.Tensor

    def attend(self, q_BH1Dh: torch.Tensor, valid_B11S: Optional[torch.Tensor], sinks_H: Optional[torch.Tensor] = None):
        """(B, H, 1, Dh): softmax(q kᵀ / sqrt(Dh)) v over the valid slots (all when None; and the sinks' logits)."""
        B, H, _, Dh = q_BH1Dh.shape
        valid_BS = torch.ones_like(self.table_BS, dtype=torch.bool) if valid_B11S is None else valid_B11S.reshape(B, -1)
        out_BHDh = torch.ops.moekit.paged_decode_attention(
            q_BH1Dh.reshape(B, H, Dh), self.pool_k_GNDh, self.pool_v_GNDh, self.table_BS, valid_BS,
            None if sinks_H is None else sinks_H.float(), Dh ** -0.5)
        return out_BHDh.view(B, H, 1, Dh)


def usable(q: torch.Tensor, pool: torch.Tensor) -> bool:
    """The kernel takes this step: float32 on CPU, the library loaded (never built here: compiled code calls
    this; `cpu_matvec.prepare` builds it), no gradient."""
    return (cpu_matvec.available_now() and q.device.type == "cpu" and q.dtype == torch.float32
            and pool.dtype == torch.float32 and not q.requires_grad)


def call(lib, q_BHDh, pool_k_GNDh, pool_v_GNDh, table_BS, valid_BS, sinks_H, scale: float) -> torch.Tensor:
    """The C kernel on checked, contiguous CPU tensors (the C code trusts its sizes)."""
    B, H, Dh = q_BHDh.shape
    G, N = pool_k_GNDh.shape[:2]
    S = table_BS.shape[1]
    if (q_BHDh.dtype != torch.float32 or pool_k_GNDh.dtype != torch.float32 or pool_v_GNDh.shape != pool_k_GNDh.shape
            or pool_k_GNDh.shape[2] != Dh or H % G or table_BS.shape != (B, S) or valid_BS.shape != (B, S)
            or (sinks_H is not None and sinks_H.shape != (H,))):
        raise ValueError(f"paged_decode_attention: q {tuple(q_BHDh.shape)}, pools {tuple(pool_k_GNDh.shape)} / "
                         f"{tuple(pool_v_GNDh.shape)}, table {tuple(table_BS.shape)}, valid {tuple(valid_BS.shape)} "
                         "do not fit (float32 q (B, H, Dh), pools (G, N, Dh), H a multiple of G, table and valid (B, S))")
    q_BHDh, pool_k_GNDh, pool_v_GNDh = (t.contiguous() for t in (q_BHDh, pool_k_GNDh, pool_v_GNDh))
    table_BS = table_BS.to(torch.int64).contiguous()
    valid_BS = valid_BS.to(torch.uint8).contiguous()
    sinks_H = None if sinks_H is None else sinks_H.to(torch.float32).contiguous()
    out_BHDh = torch.empty(B, H, Dh, dtype=torch.float32)
    status = lib.moekit_paged_decode_attention(
        q_BHDh.data_ptr(), pool_k_GNDh.data_ptr(), pool_v_GNDh.data_ptr(), table_BS.data_ptr(), valid_BS.data_ptr(),
        None if sinks_H is None else sinks_H.data_ptr(), B, H, G, S, N, Dh, scale, out_BHDh.data_ptr())
    if status == -2:
        raise IndexError(f"paged_decode_attention: a valid slot's pool index is outside [0, {N})")
    if status != 0:
        raise MemoryError("paged_decode_attention: out of memory")
    return out_BHDh


_lib = torch.library.Library("moekit", "FRAGMENT")  # the op is defined in cpu_matvec.py; its kernels:


def _paged_cpu(q, pool_k, pool_v, table, valid, sinks, scale):
    return call(cpu_matvec.library(), q, pool_k, pool_v, table, valid, sinks, scale)


def _paged_meta(q, pool_k, pool_v, table, valid, sinks, scale):
    return q.new_empty(q.shape)


_lib.impl("paged_decode_attention", _paged_cpu, "CompositeExplicitAutograd")  # cpu_ops.cpp's CPU kernel overrides it
_lib.impl("paged_decode_attention", _paged_meta, "Meta")
