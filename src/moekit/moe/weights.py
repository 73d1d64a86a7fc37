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
    every row alone in a fixed order (a GEMM's order for a row follows the row count): in eager through
    moekit's C matvec, under torch.compile as a multiply-and-sum over K that inductor generates (one
    vectorized reduction per output, fused with its neighbours, for any row count: `rowwise_product`);
    a QuantizedWeight chooses its own kernel."""
    if isinstance(w, torch.Tensor):
        if f32_kernel(x, w, rowwise):
            y = rowwise_product(x, w)
            return y if bias is None else y + bias
        return F.linear(x, w, bias)
    return w.linear(x, bias)


def rowwise_product(x: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w_NKᵀ with each row alone (float32, CPU: see `linear`). Compiled: inductor's reduction, not the
    C kernel: its own loop fuses the producer (a norm) and the consumers (RoPE, SwiGLU) and runs no
    extern call (29 per step of the small model at batch 1); the invariant engine's batch-1 step
    0.52 -> 0.62x of compiled generate (benchmarks/results/serve_cpu.md)."""
    if torch.compiler.is_compiling():
        return (x.unsqueeze(-2) * w_NK).sum(-1)
    y_RN = cpu_matvec.qmatvec("f32", x.reshape(-1, x.shape[-1]), w_NK, None, None)
    return y_RN.view(*x.shape[:-1], w_NK.shape[0])


def f32_kernel(x: torch.Tensor, w, wanted: bool) -> bool:
    """Whether a product of x with the float weight w takes the f32 C matvec: `wanted` (the caller's rule),
    and the kernel can take it (float32 on the CPU, no autograd through the weight)."""
    return (wanted and isinstance(w, torch.Tensor) and w.dtype == torch.float32 and cpu_matvec.usable("f32", x)
            and not (w.requires_grad and torch.is_grad_enabled()))


def rows_alone(module: nn.Module, x: torch.Tensor, numerics: Numerics) -> bool:
    """Whether `project(module, x, numerics)` computes each row alone, in an order that does not depend on
    the row count (so a caller may multiply fewer rows without changing a row's bits)."""
    return type(module) is nn.Linear and f32_kernel(x, module.weight, numerics.rowwise_linears)


def rowwise_everywhere(model: nn.Module) -> bool:
    """Whether rowwise numerics (`Numerics.rowwise_linears`, the invariant expert kernels) compute every row of
    `model`'s decode step alone, so its row count needs no padding: the C matvec loaded (eager's kernel, and
    `f32_kernel`'s condition), no transform's module (a QuantizedWeight or a lowp precision: their kernels
    choose their own order), every parameter float32 on the CPU and every matrix's reduction dim a multiple of
    32 (the C kernel's; embeddings and convolutions excepted: they multiply nothing row by row)."""
    if not cpu_matvec.available_now() or getattr(model, "precision", None) is not None:
        return False
    for module in model.modules():
        if hasattr(module, "rowwise_only") or (isinstance(module, nn.Linear) and type(module) is not nn.Linear):
            return False
        for p in module.parameters(recurse=False):
            if p.dtype != torch.float32 or p.device.type != "cpu":
                return False
            if p.dim() >= 2 and p.shape[-1] % 32 and not isinstance(module, (nn.Embedding, nn.Conv1d)):
                return False
    return True


def project(module: nn.Module, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    """`module(x)` for a projection (an nn.Linear, or what a transform made of it) under `numerics`: a plain
    nn.Linear follows `linear(..., rowwise=numerics.rowwise_linears)`; any other module runs its own
    forward (quantize's QuantizedLinear, lowp's LowpLinear)."""
    if numerics.rowwise_linears and type(module) is nn.Linear:
        return linear(x, module.weight, module.bias, rowwise=True)
    return module(x)


def gathered_matvec(w, index_P: torch.Tensor, x_P1K: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
    """sum_k W[index_P, n, k] * x_P1K[p, 0, k] -> (P, N), without copying the entries: under torch.compile
    the gather fuses into the reduction; float32 on CPU with more than MAX_ROWS_SHARED pairs (a static count)
    runs moekit's C kernel instead (cpu_matvec.py: pairs grouped by expert, each expert row read once per
    group of up to 8 pairs: medium model, batch-8 compiled generate 132 -> 156 tok/s).
    batch_invariant=True (experts_static under the engine's invariant numerics) chooses by mode, never by
    count: the invariant step sees a static count alone (one active row is a size-1 dimension, which dynamo
    specialises) and a symbolic one co-batched, and both must run the same code (a rule on the count sent a
    top-8 model's 8 pairs alone and 8 x rows co-batched to two kernels). Compiled: the reduction, as
    `rowwise_product` (batch 1 gains more than 64 requests at once lose: the kernel was +9-13% there); eager:
    the C kernel."""
    if isinstance(w, torch.Tensor):
        P = x_P1K.shape[0]
        if batch_invariant:
            wanted = not torch.compiler.is_compiling()
        else:
            wanted = statically_known_true(P > cpu_matvec.MAX_ROWS_SHARED)
        if f32_kernel(x_P1K, w, wanted):
            return cpu_matvec.qmatvec("f32", x_P1K.reshape(P, x_P1K.shape[-1]), w, None, index_P)
        return (w[index_P] * x_P1K).sum(-1)
    return w.gathered_matvec(index_P, x_P1K)
