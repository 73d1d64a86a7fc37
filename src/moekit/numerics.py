"""Numerics policies of the one forward: plain, and bitwise batch-invariant (the engine's).

A policy is data passed to `Transformer.forward` (through its `ForwardPlan`), never a second
forward. Two CPU effects make a row's result depend on the other rows of a batch, and the
batch-invariant policy removes both (measured with MKL, fp32, AVX-512; `tests/test_engine.py`
checks the end result, so a platform where they do not hold fails loudly):

  * GEMM rows: a row's result depends on the row count M (M=1 takes a GEMV kernel and the
    tail rows of small M other micro-kernels, with other summation orders). With M a
    multiple of 4 every row goes through the same full-panel kernel. So the policy pads
    rows (`pad_rows`) to a multiple of `row_quantum` before each GEMM whose row count
    depends on the batch: the engine pads the whole ragged batch once, and the expert
    kernel pads each expert's rows. The engine's decode step goes further (`rowwise_linears`):
    its float32 projections skip the GEMM for moekit's C matvec, whose order per row is fixed.
  * Elementwise transcendentals (sigmoid, silu, exp): the vectorized loop computes blocks
    of SIMD vectors with a SLEEF-style approximation and the leftover tail with scalar
    libm, which rounds differently; so an element's bits depend on its offset in the
    flattened tensor. `ew(fn, x)` pads the flattened input to a multiple of 64 x threads
    elements (no tail, and thread chunks stay vector-aligned).

A third rule lives in attention/base.py: batches of several rows attend with plain matmuls
(`math_attention`), since the CPU flash kernel's work split follows the batch. The rest of the
forward is row-wise with a fixed order (norms, softmax per row, top-k).

Legend: N rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EW_QUANTUM = 64  # elements per vectorized-loop iteration, with room for 512-bit bf16 vectors


def round_up(n: int, q: int) -> int:  # n rounded up to a multiple of q
    return -(-n // q) * q


@dataclass(frozen=True)
class Numerics:
    """`row_quantum` > 1 pads GEMM rows, `invariant_elementwise` pads transcendentals; `rowwise_linears`
    multiplies float32 projections through moekit's C matvec (`moe/weights.project`: each row alone, in a
    fixed order, for any row count; faster than a GEMM at a few rows): the engine's decode step.
    Default: plain."""

    row_quantum: int = 1
    invariant_elementwise: bool = False
    rowwise_linears: bool = False

    @property
    def batch_invariant(self) -> bool:
        return self.row_quantum > 1

    def ew(self, fn, x: torch.Tensor) -> torch.Tensor:
        """Elementwise `fn` with every element in the vectorized body (see the module docstring)."""
        if not self.invariant_elementwise:
            return fn(x)
        flat = x.reshape(-1)
        n = flat.numel()
        n_pad = round_up(max(n, 1), EW_QUANTUM * max(1, thread_count()))
        return fn(F.pad(flat, (0, n_pad - n)))[:n].view(x.shape)

    def pad_rows(self, x_ND: torch.Tensor) -> torch.Tensor:
        return pad_rows(x_ND, self.row_quantum)

    def matmul_attention(self, q_BHTDh: torch.Tensor, mask) -> bool:
        """Whether attention over a cache (`mask` not None) runs as plain batched matmuls (`math_attention`)
        rather than the fused kernel: under batch invariance, for several rows (the CPU flash kernel's work
        split follows the batch; see the module docstring)."""
        return self.batch_invariant and mask is not None and q_BHTDh.shape[0] > 1


def thread_count() -> int:
    """torch's intra-op threads. Dynamo cannot trace torch.get_num_threads (the batch-invariant step of a
    model with a dense FFN failed to compile), so `runtime.compile_fn` marks this function with
    `torch.compiler.assume_constant_result`: a compiled step reads it once, when traced. (Marked there, not
    here, so that importing moekit does not import dynamo.)"""
    return torch.get_num_threads()


def pad_rows(x_ND: torch.Tensor, q: int) -> torch.Tensor:
    """x with zero rows appended up to a multiple of q rows (at least q)."""
    n = x_ND.shape[0]
    n_pad = round_up(max(n, 1), q)
    return x_ND if n_pad == n else F.pad(x_ND, (0, 0, 0, n_pad - n))


PLAIN = Numerics()
BATCH_INVARIANT = Numerics(row_quantum=4, invariant_elementwise=True)
