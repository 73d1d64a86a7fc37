"""Shared pieces of the Triton kernels: interpreter flag, dtypes, the tile-schedule
helper and the dot helper.

Legend: E experts, P (token, expert) pairs sorted by expert, M rows of one tile.

Tile-aligned schedule. The pairs are sorted by expert; expert e owns the rows
[offsets[e], offsets[e+1]). A varlen-M grouped GEMM with row tile BLOCK_M runs
ceil(count_e / BLOCK_M) tiles for expert e, and program `pid_m` takes the
`pid_m`-th tile in expert order. `expert_tile` computes that mapping inside the
kernel from the E+1 offsets (a vector cumsum, no host-side schedule), so the
autotuner may change BLOCK_M freely and nothing syncs with the host. The launch
grid is the static bound cdiv(P, BLOCK_M) + E on the number of tiles; programs
past the last tile return at once. With token rounding every count is a multiple
of the rounding tile (128 by default), so with BLOCK_M dividing it no tile is
partly empty.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when a kernel is defined, so the mode of these
# kernels is fixed when this package is first imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_type(dtype: torch.dtype):
    """Accumulator type: float64 for float64 inputs, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """float32/float64 operands multiply in full precision (no TF32), like torch.matmul."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def block_e(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


@triton.jit
def expert_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row of the expert) of row tile `pid_m`; expert == E when
    `pid_m` is past the last tile."""
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    starts = tl.load(offsets_ptr + e, mask=emask, other=0)
    ends = tl.load(offsets_ptr + e + 1, mask=emask, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, axis=0)  # tiles of experts 0..e, inclusive
    expert = tl.sum((last <= pid_m).to(tl.int32), axis=0)
    this = e == expert
    first_tile = tl.sum(tl.where(this, last - tiles, 0), axis=0)
    start = tl.sum(tl.where(this, starts, 0), axis=0)
    end = tl.sum(tl.where(this, ends, 0), axis=0)
    return expert, start + (pid_m - first_tile) * BLOCK_M, end


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter only): numpy has no bfloat16 matmul, so the
    operands are widened to the accumulator type first (exact: same products)."""
    if UPCAST:
        a = a.to(acc.dtype)
        b = b.to(acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION)
