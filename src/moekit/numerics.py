"""Numerics policies of the one forward: plain, and bitwise batch-invariant (the engine's).

A policy is data passed to `Transformer.forward` (through its `ForwardPlan`), never a second
forward. Two CPU effects make a row's result depend on the other rows of a batch, and the
batch-invariant policy removes both (measured with MKL, fp32, AVX-512; `tests/test_engine.py`
checks the end result, so a platform where they do not hold fails loudly):

  * GEMM rows: a row's result depends on the row count M (M=1 takes a GEMV kernel and the
    tail rows of small M other micro-kernels, with other summation orders). With M a
    multiple of the BLAS's row panel every row goes through the same full-panel kernel. So the
    policy pads rows (`pad_rows`) to a multiple of `row_quantum` before each GEMM whose row count
    depends on the batch: the engine pads the whole ragged batch once, and the expert
    kernel pads each expert's rows. The panel is the BLAS's choice, so `gemm_row_quantum` measures
    it once per process and device (MKL: 4 on an AMD EPYC, 16 on an Intel Xeon with AMX, whose
    kernels for 4 <= M < 16 sum in another order). The engine's decode step goes further (`rowwise_linears`):
    its float32 projections skip the GEMM for moekit's C matvec, whose order per row is fixed; where its step
    then has no product over rows at all (`rows_multiplied`), its buckets need no quantum (engine/forward.py).
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

import functools
from dataclasses import dataclass
from typing import Optional

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


QUANTA = (4, 8, 16, 32, 64)  # the row quanta `gemm_row_quantum` tries, smallest first
PROBE_SHAPES = ((64, 512), (256, 768), (64, 8), (512, 512), (1024, 256))  # (K, N) of the probe's weights
PROBE_ROWS = (1, 2, 3, 5, 7, 9, 13, 30, 61, 96)  # row counts M of the probe's GEMMs


@functools.lru_cache(maxsize=None)
def gemm_row_quantum(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Optional[int]:
    """The smallest q of QUANTA for which a GEMM (`F.linear`) on `device` in `dtype`, its M rows padded to a
    multiple of q, gives each row the bits it gets in a GEMM of q rows, for M in PROBE_ROWS and the weight
    shapes PROBE_SHAPES (random data, a fixed seed: a few milliseconds); None where no q does."""
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.randn(n, k, generator=gen).to(device, dtype), torch.randn(96, k, generator=gen).to(device, dtype))
             for k, n in PROBE_SHAPES]
    for q in QUANTA:
        if all(invariant_at(q, w_NK, x_MK) for w_NK, x_MK in cases):
            return q
    return None


def invariant_at(q: int, w_NK: torch.Tensor, x_MK: torch.Tensor) -> bool:
    """Whether rows of x taken m at a time (m in PROBE_ROWS), padded to a multiple of q, multiply by w to the
    bits they get q at a time."""
    M = x_MK.shape[0]
    canon = torch.cat([F.linear(x_MK[i:i + q], w_NK) for i in range(0, M, q)])
    order = torch.randperm(M, generator=torch.Generator().manual_seed(q)).to(x_MK.device)
    return all(torch.equal(F.linear(pad_rows(x_MK[order[:m]], q), w_NK)[:m], canon[order[:m]])
               for m in PROBE_ROWS if m <= M)


def batch_invariant(device="cpu", dtype: torch.dtype = torch.float32) -> Numerics:
    """The engine's batch-invariant policy on `device` in `dtype`: rows padded to the measured GEMM row quantum
    (`gemm_row_quantum`) and padded transcendentals; ValueError where no quantum makes GEMM rows invariant."""
    q = gemm_row_quantum(torch.device(device).type, dtype)
    if q is None:
        raise ValueError(f"batch-invariant numerics are not available here: no row padding up to {QUANTA[-1]} "
                         f"makes a {dtype} GEMM row's bits independent of the other rows on {device}; "
                         "use batch_invariant=False")
    return Numerics(row_quantum=q, invariant_elementwise=True)


# words in the names of torch's operators that multiply matrices over a batch's rows (GEMMs, batched GEMMs,
# matrix-vector products, fused attention, convolutions): their order of additions may follow the row count
ROW_PRODUCTS = ("mm", "mv", "dot", "matmul", "linear", "attention", "conv")


def rows_multiplied(fn) -> list:
    """The operators `fn()` runs whose result for one row may depend on how many rows there are: torch's
    matrix products and fused attention (`ROW_PRODUCTS`) and any operator outside torch and moekit (not
    known to compute rows alone). moekit's own operators (the C matvec, the paged decode attention) compute
    each row alone, in a fixed order. Runs `fn` once, under a dispatch mode that records the operators."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            space, name = func.namespace, func.__name__
            if space != "moekit" and (space != "aten" or any(word in name for word in ROW_PRODUCTS)):
                found.append(f"{space}::{name}")
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return sorted(set(found))


PLAIN = Numerics()
