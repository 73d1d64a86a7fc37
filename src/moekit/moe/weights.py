"""The weight accessor: how every kernel reads a weight, a tensor or an object standing in for
one (moekit.quantize's `QuantizedWeight`) with the methods `dense(index, dtype)`,
`linear(x, bias)` and `gathered_matvec(index_P, x_P1K)` and the property `rowwise_only`. Kernels
call the functions below, so a transform replaces the weights, not the modules (docs/architecture.md).

Legend: P pairs, N output dim, K reduction dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import cpu_matvec
from ..numerics import Numerics


def dense(w, index: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        out = w if index is None else w[index]
        return out if dtype is None or out.dtype == dtype else out.to(dtype)
    return w.dense(index, dtype)


def rowwise_only(w) -> bool:
    """Whether `w` must be multiplied through `linear` / `gathered_matvec` only, never as `dense()` in a
    kernel's own GEMM (a QuantizedWeight with 8-bit activations; plain tensors: never)."""
    return not isinstance(w, torch.Tensor) and w.rowwise_only


def linear(x: torch.Tensor, w, bias: Optional[torch.Tensor] = None, rowwise: bool = False) -> torch.Tensor:
    """x @ wᵀ (+ bias). rowwise=True (`Numerics.rowwise_linears`): a float32 weight on the CPU multiplies
    through moekit's C matvec where usable, every row alone in a fixed order (a GEMM's order for a row
    follows the row count); a QuantizedWeight chooses its own kernel."""
    if isinstance(w, torch.Tensor):
        if f32_kernel(x, w, rowwise):
            K = x.shape[-1]
            y_RN = cpu_matvec.qmatvec("f32", x.reshape(-1, K), w, None, None)
            y = y_RN.view(*x.shape[:-1], w.shape[0])
            return y if bias is None else y + bias
        return F.linear(x, w, bias)
    return w.linear(x, bias)


def f32_kernel(x: torch.Tensor, w, wanted: bool) -> bool:
    """Whether a product of x with the float weight w takes the f32 C matvec: `wanted` (the caller's rule),
    and the kernel can take it (float32 on the CPU, no autograd through the weight)."""
    return (wanted and w.dtype == torch.float32 and cpu_matvec.usable("f32", x)
            and not (w.requires_grad and torch.is_grad_enabled()))


def rows_alone(module: nn.Module, x: torch.Tensor, numerics: Numerics) -> bool:
    """Whether `project(module, x, numerics)` computes each row alone, in an order that does not depend on
    the row count (so a caller may multiply fewer rows without changing a row's bits)."""
    return type(module) is nn.Linear and f32_kernel(x, module.weight, numerics.rowwise_linears)


def project(module: nn.Module, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    """`module(x)` for a projection (an nn.Linear, or what a transform made of it) under `numerics`: a plain
    nn.Linear follows `linear(..., rowwise=numerics.rowwise_linears)`; any other module runs its own
    forward (quantize's QuantizedLinear, lowp's LowpLinear)."""
    if numerics.rowwise_linears and type(module) is nn.Linear:
        return linear(x, module.weight, module.bias, rowwise=True)
    return module(x)


def project_all(modules, x: torch.Tensor, numerics: Numerics) -> list:
    """[project(m, x, numerics) for m in modules]: projections of one input (attention's q, k and v). Where each
    is a plain float32 nn.Linear taking the C matvec (`rows_alone`), all of them in one C call
    (`cpu_matvec.f32matvec_cat`: one call and one parallel region instead of one each, the same bits); each
    result is then a contiguous view of the call's output."""
    if len(modules) < 2 or not all(rows_alone(m, x, numerics) for m in modules):
        return [project(m, x, numerics) for m in modules]
    ys = cpu_matvec.f32matvec_cat(x.reshape(-1, x.shape[-1]), [m.weight for m in modules])
    return [(y if m.bias is None else y + m.bias).view(*x.shape[:-1], m.out_features) for y, m in zip(ys, modules)]


def gathered_matvec(w, index_P: torch.Tensor, x_P1K: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """sum_k W[index_P, n, k] * x_P1K[p, 0, k] -> (P, N), without copying the entries: under torch.compile
    the gather fuses into the reduction; float32 on CPU with more than MAX_ROWS_SHARED pairs (a static count)
    runs moekit's C kernel instead (cpu_matvec.py: pairs grouped by expert, each expert row read once per
    group of up to 8 pairs: faster for the medium model at batch 8). batch_invariant=True
    (experts_static under the engine's invariant numerics) takes the kernel for every count where usable:
    the invariant step sees a static count alone (dynamo specialises the size-1 dimension of one active row)
    and a symbolic one co-batched, and both must run the same code (a rule on the count sent a top-8
    model's 8 pairs alone and 8 x rows co-batched to two kernels). The kernel rather than the reduction:
    faster at 64 requests at once, a little slower for a lone request on the medium model (K=1024: 16
    weight rows streamed at once); measured in benchmarks/results/serve_cpu.md. Eager: the kernel where
    usable, else the pairs' weights copied (dequantized) and one bmm."""
    if isinstance(w, torch.Tensor):
        P = x_P1K.shape[0]
        compiling = torch.compiler.is_compiling()
        rule = batch_invariant or not compiling or statically_known_true(P > cpu_matvec.MAX_ROWS_SHARED)
        if f32_kernel(x_P1K, w, rule):
            return cpu_matvec.qmatvec("f32", x_P1K.reshape(P, x_P1K.shape[-1]), w, None, index_P)
        if not compiling:
            return pairs_bmm(w, index_P, x_P1K)
        return (w[index_P] * x_P1K).sum(-1)
    return w.gathered_matvec(index_P, x_P1K, batch_invariant)


def pairs_bmm(w, index_P: torch.Tensor, x_P1K: torch.Tensor) -> torch.Tensor:
    """(P, N): the pairs' weights copied (a QuantizedWeight: dequantized) in x's dtype, then one bmm (eager)."""
    return torch.bmm(dense(w, index_P, x_P1K.dtype), x_P1K.transpose(1, 2)).squeeze(-1)
