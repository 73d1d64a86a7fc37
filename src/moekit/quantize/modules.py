"""Quantized modules: a stored weight, and drop-in replacements for Linear, SwiGLU and Experts.

Every forward dequantizes to the activation dtype and then runs the float op (the
reference numerics: dequantize, then matmul). What is dequantized:
  QuantizedLinear / QuantizedSwiGLU  the whole weight, at every call;
  QuantizedExperts                   with few (token, expert) pairs and no autograd (decoding,
                                     the condition of moe/decode.py's gathered-weights path) only
                                     the experts of those pairs, one copy per pair; otherwise all
                                     E experts once, then the configured backend (grouped/reference).
Static / compiled decoding (`Transformer.decode_step`, `generate(compile=True)`): a Linear
with a few rows under torch.compile, and the routed experts of `QuantizedMoE.forward_static`
(K experts per token, T*K <= E), use `formats.fused_matvec` instead: a per-group reduction
over the packed codes that inductor fuses into one pass over the packed bytes (the gather of
the chosen experts' bytes included), so the dequantized weights are never written out.
`QuantizedMoE` is `MoE` with that static forward; the transform swaps it in for each MoE
layer, keeping the router, shared experts and buffers (same state-dict keys).

`QuantizedWeight` stands where the float tensor stood (`linear.weight`, `experts.w13`, ...)
and quacks like it for the read-only uses elsewhere in moekit: `.shape`, `.dtype` (the
compute dtype, carried by a zero-size parameter so `model.to(dtype)` and loading with a
dtype move it), `.device`, `w[idx]` (dequantizes the rows/experts `idx` of dim 0) and
`.transpose(a, b)` (dequantizes everything). The quantized buffers never change dtype.

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs, N out, K in.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.decode import experts_static, use_gathered_weights
from ..moe.experts import get_backend
from ..moe.grouped import experts_grouped
from ..moe.layer import MoE
from . import formats

_FUSED_MAX_ROWS = 4  # rows of x up to which a compiled Linear uses the fused multiply-and-reduce


class QuantizedWeight(nn.Module):
    """A weight (..., K) stored in one of `formats.METHODS` (buffers qweight, scale[, offset])."""

    def __init__(self, method: str, shape, packed: formats.Packed, dtype: torch.dtype):
        super().__init__()
        formats.get_format(method)
        self.method = method
        self.shape = torch.Size(shape)
        self._names = tuple(packed)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor)
        device = packed["qweight"].device
        self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, method: str) -> "QuantizedWeight":
        return cls(method, weight.shape, formats.quantize(method, weight), weight.dtype)

    # -- tensor-like read-only surface
    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (packed values and scales)."""
        return formats.packed_nbytes(self.packed())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel()

    def packed(self, index=None) -> formats.Packed:
        """The storage tensors, restricted to `index` along dim 0 when given."""
        tensors = {name: getattr(self, name) for name in self._names}
        if index is not None:
            tensors = {name: t[index] for name, t in tensors.items()}
        return tensors

    def dequantize(self, index=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight (or its entries `index` of dim 0) in `dtype` (default: the compute dtype)."""
        return formats.dequantize(self.method, self.packed(index), self.shape[-1], dtype or self.dtype)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, tuple):
            return self.dequantize()[index]
        return self.dequantize(index)

    def transpose(self, dim0: int, dim1: int) -> torch.Tensor:
        return self.dequantize().transpose(dim0, dim1)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, shape={tuple(self.shape)}, bits_per_weight={self.bits_per_weight():.3f}"


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear with a quantized weight (fused multiply-and-reduce for few rows under torch.compile)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if torch.compiler.is_compiling() and rows <= _FUSED_MAX_ROWS:
        y_MN = formats.fused_matvec(weight.method, weight.packed(), x.reshape(rows, 1, x.shape[-1]))
        y = y_MN.reshape(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight.dequantize(dtype=x.dtype), bias)


class QuantizedLinear(nn.Module):
    """nn.Linear with a quantized weight (the bias stays float)."""

    def __init__(self, weight: QuantizedWeight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = weight
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_float(cls, linear: nn.Linear, method: str) -> "QuantizedLinear":
        return cls(QuantizedWeight.from_float(linear.weight, method), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantizedSwiGLU(nn.Module):
    """`moe.ffn.SwiGLU` (dense FFN, shared experts) with quantized w13 (2F, D) and w2 (D, F)."""

    def __init__(self, w13: QuantizedWeight, w2: QuantizedWeight):
        super().__init__()
        self.w13, self.w2 = w13, w2

    @classmethod
    def from_float(cls, ffn: nn.Module, method: str) -> "QuantizedSwiGLU":
        return cls(QuantizedWeight.from_float(ffn.w13, method), QuantizedWeight.from_float(ffn.w2, method))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate_TF, up_TF = quantized_linear(x_TD, self.w13).chunk(2, dim=-1)
        return quantized_linear(F.silu(gate_TF) * up_TF, self.w2)

    def extra_repr(self) -> str:
        return f"d_model={self.w13.shape[1]}, d_ff={self.w2.shape[1]}"


@torch.no_grad()
def experts_per_pair(x_TD, w13_P2FD, w2_PDF, gates_P, token_idx_P) -> torch.Tensor:
    """moe/decode.py's `experts_gathered_weights` with the weights already gathered per pair."""
    n = w2_PDF.shape[-1]
    x_PD1 = x_TD.index_select(0, token_idx_P).unsqueeze(-1)
    h_P2F = torch.bmm(w13_P2FD, x_PD1).squeeze(-1)
    a_PF1 = (F.silu(h_P2F[:, :n]) * h_P2F[:, n:] * gates_P.to(x_TD.dtype)[:, None]).unsqueeze(-1)
    y_PD = torch.bmm(w2_PDF, a_PF1).squeeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, token_idx_P, y_PD)


class QuantizedExperts(nn.Module):
    """`moe.experts.Experts` with quantized w13 (E, 2F, D) and w2 (E, D, F); same forward signature."""

    def __init__(self, w13: QuantizedWeight, w2: QuantizedWeight, impl: str = "grouped", layout: str = "auto"):
        super().__init__()
        self.w13, self.w2 = w13, w2
        self.impl, self.layout = impl, layout
        self._backend = get_backend(impl)

    @classmethod
    def from_float(cls, experts: nn.Module, method: str) -> "QuantizedExperts":
        return cls(QuantizedWeight.from_float(experts.w13, method), QuantizedWeight.from_float(experts.w2, method),
                   experts.impl, experts.layout)

    def set_impl(self, name: str, layout: str = None) -> None:
        self._backend = get_backend(name)
        self.impl = name
        if layout is not None:
            self.layout = layout

    def forward(self, x_TD: torch.Tensor, gates_P: torch.Tensor, token_idx_P: torch.Tensor,
                expert_idx_P: torch.Tensor) -> torch.Tensor:
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):
            x_TD = x_TD.to(torch.get_autocast_dtype(device_type))
        dtype = x_TD.dtype
        if use_gathered_weights(x_TD, expert_idx_P.numel(), self.w13.shape[0]):
            # few pairs: dequantize only the experts they use (at most E expert copies)
            return experts_per_pair(x_TD, self.w13.dequantize(expert_idx_P, dtype),
                                    self.w2.dequantize(expert_idx_P, dtype), gates_P, token_idx_P)
        w13_EFD, w2_EDF = self.w13.dequantize(dtype=dtype), self.w2.dequantize(dtype=dtype)
        if self.impl == "grouped":
            return experts_grouped(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, self.layout)
        return self._backend(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P)

    def extra_repr(self) -> str:
        E, F2, D = self.w13.shape
        return f"num_experts={E}, d_model={D}, d_expert={F2 // 2}, impl={self.impl!r}, method={self.w13.method!r}"

    def forward_static(self, x_TD: torch.Tensor, gates_TK: torch.Tensor, expert_idx_TK: torch.Tensor) -> torch.Tensor:
        """moe/decode.py's `experts_static` (K experts per token, no host syncs) on the packed weights:
        with T*K <= E pairs a fused reduction over each pair's gathered packed bytes, else every
        expert dequantized once and `experts_static`'s dense path."""
        T, K = expert_idx_TK.shape
        if T * K > self.w13.shape[0]:
            dtype = x_TD.dtype
            return experts_static(x_TD, self.w13.dequantize(dtype=dtype), self.w2.dequantize(dtype=dtype),
                                  gates_TK, expert_idx_TK)
        n = self.w2.shape[-1]
        expert_idx_P = expert_idx_TK.reshape(-1)
        x_P1D = x_TD[:, None].expand(T, K, x_TD.shape[-1]).reshape(T * K, 1, -1)
        h_P2F = formats.fused_matvec(self.w13.method, self.w13.packed(expert_idx_P), x_P1D)
        a_P1F = (F.silu(h_P2F[:, :n]) * h_P2F[:, n:] * gates_TK.to(x_TD.dtype).reshape(-1, 1)).unsqueeze(1)
        y_PD = formats.fused_matvec(self.w2.method, self.w2.packed(expert_idx_P), a_P1F)
        return y_PD.view(T, K, -1).sum(1)


class QuantizedMoE(MoE):
    """`MoE` whose static forward (compiled decoding) runs `QuantizedExperts.forward_static`."""

    @classmethod
    def from_moe(cls, moe: MoE, experts: QuantizedExperts, shared: Optional[nn.Module]) -> "QuantizedMoE":
        with torch.device("meta"):  # no float expert weights are allocated; every submodule is replaced
            new = cls(moe.cfg)
        new.router, new.experts, new.shared, new.shared_gate = moe.router, experts, shared, moe.shared_gate
        new.tokens_since_update = moe.tokens_since_update
        return new.train(moe.training)

    def forward_static(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x_TD = x.reshape(-1, self.cfg.d_model)
        expert_idx_TK, gates_TK = self.router.route_static(x_TD, token_ids)
        y_TD = self.experts.forward_static(x_TD, gates_TK, expert_idx_TK)
        if self.shared is not None:
            y_TD = y_TD + self._shared(x_TD)
        return y_TD.view(x.shape)
