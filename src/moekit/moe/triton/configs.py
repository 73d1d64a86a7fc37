"""Autotune configurations.

On a GPU: tiles for bfloat16 operands with float32 accumulation on Hopper/Ampere
(128x128x64 tiles with 8 warps and 3 stages fit in shared memory; float32
operands use more shared memory, and configs that do not fit are skipped by the
autotuner). Under TRITON_INTERPRET=1 a single small config, so nothing is
benchmarked and the CPU tests stay fast (tl.dot needs every dimension >= 16).

Each kernel is tuned per (N, K)-like key; the number of rows changes with the
routing and is not part of the key.
"""

from __future__ import annotations

from typing import List

import triton

from .common import INTERPRET


def _cfgs(rows) -> List[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in rows
    ]


_TINY = [(16, 16, 16, 1, 1)]


def up_swiglu_configs() -> List[triton.Config]:
    """Gathered X @ W13 with two accumulators (gate and up columns)."""
    if INTERPRET:
        return _cfgs(_TINY)
    return _cfgs([
        (128, 64, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 64, 32, 4, 4),
    ])


def gmm_configs() -> List[triton.Config]:
    """Plain varlen-M grouped GEMM (down projection, dX)."""
    if INTERPRET:
        return _cfgs(_TINY)
    return _cfgs([
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 256, 32, 4, 4),
    ])


def dh_configs() -> List[triton.Config]:
    """dO gathered @ W2 with the SwiGLU-backward epilogue (loops over all F columns)."""
    if INTERPRET:
        return _cfgs(_TINY)
    return _cfgs([
        (128, 64, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (64, 128, 64, 4, 3),
        (64, 64, 64, 4, 4),
    ])


def wgrad_configs() -> List[triton.Config]:
    """Varlen-K grouped GEMM (dW13, dW2): BLOCK_K is the row chunk."""
    if INTERPRET:
        return _cfgs(_TINY)
    return _cfgs([
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
    ])


def aggregate_configs() -> List[triton.Config]:
    """Gather-and-sum over each token's pairs: one token and BLOCK_D columns per program."""
    if INTERPRET:
        return [triton.Config({"BLOCK_D": 32}, num_warps=1)]
    return [
        triton.Config({"BLOCK_D": d}, num_warps=w)
        for d, w in [(256, 2), (512, 4), (1024, 4), (1024, 8)]
    ]
