"""The weight accessor: how every kernel reads a weight, float or transformed.

A weight is a plain tensor, or an object that stands in for one (moekit.quantize's
`QuantizedWeight`; later low-precision or sharded weights) and provides:

    dense(index=None, dtype=None)      the float weight (or its entries `index` of dim 0)
    linear(x, bias=None)               F.linear(x, weight, bias)
    gathered_matvec(index_P, x_P1K)    sum_k W[index_P, n, k] * x_P1K[p, 0, k] -> (P, N)

Kernels call the three functions below and never ask what kind of weight they hold, so a
transform of `Experts` or `SwiGLU` replaces the weights, not the modules.

Legend: P pairs, N output dim, K reduction dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def is_weight(w) -> bool:
    return isinstance(w, torch.Tensor) or hasattr(w, "dense")


def dense(w, index: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        out = w if index is None else w[index]
        return out if dtype is None or out.dtype == dtype else out.to(dtype)
    return w.dense(index, dtype)


def linear(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return w.linear(x, bias)


def gathered_matvec(w, index_P: torch.Tensor, x_P1K: torch.Tensor) -> torch.Tensor:
    """Each pair's matrix-vector product with its own entry of w, without copying the entries
    (under torch.compile the gather fuses into the reduction)."""
    if isinstance(w, torch.Tensor):
        return (w[index_P] * x_P1K).sum(-1)
    return w.gathered_matvec(index_P, x_P1K)
