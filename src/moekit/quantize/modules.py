"""A quantized weight, and the quantized Linear.

`QuantizedWeight` stands where a float weight stood (`linear.weight`, `experts.w13`, `ffn.w2`, ...)
and implements the weight accessor of moe/weights.py (`dense`, `linear`, `gathered_matvec`: see
docs/architecture.md), so the modules and every expert kernel run on it unchanged. Eager, one row
and expert pairs go through the C kernel where usable (below), other products
dequantize, then run the float op; compiled, `linear` with few rows and `gathered_matvec` reduce
straight from the packed bytes: torch.compile's fused loop for one row (and for few expert pairs), the C
kernel of cpu_matvec.py for more rows of a q8_0/q4_0/mxfp4 weight on CPU (it decodes each block once for all
the rows that share a weight, where inductor's loop decodes it again per row; under the engine's batch
invariance, expert pairs take that kernel for any count; mxfp4 takes it for any count, since its fused loop
looks each E2M1 value up in a table, which inductor does not vectorise: `Format.kernel_for_few_rows`). Formats
with fp16 group scales (q8_0, q4_0, int4-gG) also keep float32 copies of them (`scale_f32`, `offset_f32`:
non-persistent buffers, 32 bits per group at run time, not saved, rebuilt from the stored bits after every
move, cast or load) for the fused loop, which inductor vectorises only over float32 scales, and the C kernel
(`kernel_scale`; mxfp4's kernel reads its E8M0 bytes as they are). It quacks like a tensor for read-only
uses (`.shape`, `.device`, `w[idx]`, `.dtype`: the compute dtype, carried by a zero-size parameter so that
`model.to(dtype)` moves it, while the quantized buffers never change dtype).

gpt-oss's MXFP4 experts are adopted packed, bit for bit, and written back the same way:

    w = QuantizedWeight.from_mxfp4_blocks(blocks, scales, dtype=torch.bfloat16)
        # blocks uint8 (..., N, K/32, 16), scales uint8 (..., N, K/32) -> an mxfp4 weight (..., N, K)
    blocks, scales = w.mxfp4_blocks()   # the inverse (views of the buffers)

Legend: P pairs, M rows of x, N out, K in.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..moe.weights import pairs_bmm
from ..runtime import materialized
from .. import cpu_matvec
from . import activations, formats

# rows of x up to which a compiled linear uses the fused multiply-and-reduce (it reads the packed weight once
# per row: at 2048x2048 on 2 CPU cores it beats dequantize + GEMM up to ~16 rows for q8_0, ~8 for q4_0)
FUSED_MAX_ROWS = 8


class QuantizedWeight(nn.Module):
    """A weight (..., K) stored in one of `formats.METHODS` (buffers qweight, scale[, offset])."""

    def __init__(self, method: str, shape, packed: formats.Packed, dtype: torch.dtype):
        super().__init__()
        formats.get_format(method)
        self.method = method
        self.shape = torch.Size(shape)
        self.activations = "float"  # or "q8_0" (q8_0/q4_0 weights; transform.set_activations, activations.py)
        self.buffer_names = tuple(packed)
        for name, tensor in packed.items():
            self.register_buffer(name, tensor)
        self.dtype_anchor = nn.Parameter(torch.empty(0, dtype=dtype, device=packed["qweight"].device),
                                         requires_grad=False)
        self.refresh_float_copies()

    def refresh_float_copies(self) -> None:
        """(Re)build the float32 mirrors of the format's fp16-bit group tensors (see the module docstring)."""
        for name in self.fmt.float_copies:
            self.register_buffer(name + "_f32", self.fmt.float_copy(name, getattr(self, name)), persistent=False)
        cpu_matvec.prepare(self.method, self.qweight.device)
        panels = (None, None)  # 8-bit activations: the C kernel's repacked copy (activations.py), where it runs
        if self.rowwise_only and self.qweight.device.type == "cpu" and cpu_matvec.available():
            panels = cpu_matvec.x8_pack(cpu_matvec.library(), self.method, self.qweight, self.scale_f32)
        self.register_buffer("x8_panels", panels[0], persistent=False)
        self.register_buffer("x8_scale", panels[1], persistent=False)

    def set_activations(self, kind: str) -> None:
        """"float" (default) or "q8_0": 8-bit activations, for q8_0/q4_0 weights (activations.py)."""
        activations.check_kind(kind)
        if kind != "float" and self.method not in activations.WEIGHT_METHODS:
            raise ValueError(f"activations={kind!r} needs a q8_0 or q4_0 weight; this one is {self.method}")
        self.activations = kind
        self.refresh_float_copies()

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the mirrors follow the stored bits
        super()._apply(fn, recurse)
        self.refresh_float_copies()
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # load_state_dict (also assign=True)
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_float_copies()

    @classmethod
    def from_float(cls, weight: torch.Tensor, method: str) -> "QuantizedWeight":
        return cls(method, weight.shape, formats.quantize(method, weight), weight.dtype)

    @classmethod
    def from_mxfp4_blocks(cls, blocks: torch.Tensor, scales: torch.Tensor,
                          dtype: torch.dtype = torch.bfloat16) -> "QuantizedWeight":
        """An mxfp4 weight (..., N, K) holding gpt-oss's `*_blocks` uint8 (..., N, K/32, 16) and
        `*_scales` uint8 (..., N, K/32) as they are (no copy); `dtype` is the compute dtype."""
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
        if blocks.dim() < 3 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
                             "expected blocks (..., N, K/32, 16) and scales (..., N, K/32)")
        shape = (*blocks.shape[:-2], blocks.shape[-2] * 32)
        return cls("mxfp4", shape, {"qweight": blocks.reshape(*blocks.shape[:-2], -1), "scale": scales}, dtype)

    def mxfp4_blocks(self):
        """(blocks (..., N, K/32, 16), scales (..., N, K/32)) of an mxfp4 weight: gpt-oss's layout."""
        if self.method != "mxfp4":
            raise ValueError(f"mxfp4_blocks needs an mxfp4 weight, this one is {self.method!r}")
        return self.qweight.view(*self.scale.shape, 16), self.scale

    # -- tensor-like read-only surface
    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dim(self) -> int:
        return len(self.shape)

    ndim = property(dim)

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
        tensors = {name: getattr(self, name) for name in self.buffer_names}
        if index is not None:
            tensors = {name: t[index] for name, t in tensors.items()}
        return tensors

    def __getitem__(self, index) -> torch.Tensor:
        return self.dense()[index] if isinstance(index, tuple) else self.dense(index)

    # -- the weight accessor (moe/weights.py)
    def dense(self, index=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight (or its entries `index` of dim 0) in `dtype` (default: the compute dtype)."""
        return formats.dequantize(self.method, self.packed(index), self.shape[-1], dtype or self.dtype)

    @property
    def fmt(self) -> formats.Format:
        return formats.get_format(self.method)

    @property
    def rowwise_only(self) -> bool:
        """Every product must go through `linear` / `gathered_matvec` (8-bit activations): kernels must not
        multiply `dense()` themselves (moe/experts.py takes the per-pair path)."""
        return self.activations != "float"

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x @ Wᵀ (+ bias). 8-bit activations: `x8_matvec`, eager and compiled, any row count. Otherwise,
        eager: the C kernel where usable for one row, else dequantize + GEMM (one rule for every count above
        one: the batch-invariant policy pads rows to a multiple of 4 and relies on the GEMM's order for
        them, so a kernel for some counts and the GEMM for others would make a row's bits follow the batch);
        under torch.compile: the C kernel where `cpu_matvec.usable` (q8_0/q4_0/mxfp4, float32 x
        on CPU) for 2 or more rows or a symbolic row count; the fused reduction for one row or, in other
        formats, a static count <= FUSED_MAX_ROWS; else dequantize + GEMM. The choice never depends on the
        batch under dynamic shapes (the batch-invariant engine's one step for every bucket): a symbolic
        count takes the kernel (every row computed alone, in a fixed order) or, without it, the GEMM."""
        K = x.shape[-1]
        rows = x.numel() // K if K else 0
        if self.rowwise_only:
            y = self.x8_matvec(x.reshape(rows, K), None).reshape(*x.shape[:-1], self.shape[0])
            return y if bias is None else y + bias
        if torch.compiler.is_compiling():  # (statically_known_true: False for a symbolic count, and no guard)
            one_row = statically_known_true(rows <= 1) and not self.fmt.kernel_for_few_rows
            if not one_row and cpu_matvec.usable(self.method, x):
                y = self.kernel_matvec(x.reshape(rows, K), None).to(x.dtype).reshape(*x.shape[:-1], self.shape[0])
                return y if bias is None else y + bias
            if statically_known_true(rows <= FUSED_MAX_ROWS):
                y_MN = formats.fused_matvec(self.method, self.fused_inputs(), materialized(x.reshape(rows, 1, K)))
                y = y_MN.reshape(*x.shape[:-1], self.shape[0])
                return y if bias is None else y + bias
        elif rows == 1 and cpu_matvec.usable(self.method, x):  # eager batch-1 decode (see the docstring)
            y = self.kernel_matvec(x.reshape(rows, K), None).reshape(*x.shape[:-1], self.shape[0])
            return y if bias is None else y + bias
        return F.linear(x, self.dense(dtype=x.dtype), bias)

    def gathered_matvec(self, index_P: torch.Tensor, x_P1K: torch.Tensor,
                        batch_invariant: bool = False) -> torch.Tensor:
        """Row p of x against expert index_P[p]: the C kernel where usable for more than MAX_ROWS_SHARED
        pairs or a symbolic count (pairs grouped by expert), or eagerly for any count; else compiled, the fused
        reduction, eager, the pairs' experts dequantized and one bmm (`pairs_bmm`). batch_invariant=True:
        the kernel for any count where usable (a lone request's pairs are a static count, co-batched ones a
        symbolic one: two kernels gave a q4_0 request other bits alone over 40 tokens)."""
        P = x_P1K.shape[0]
        if self.rowwise_only:
            return self.x8_matvec(x_P1K.reshape(P, x_P1K.shape[-1]), index_P)
        few = (torch.compiler.is_compiling() and statically_known_true(P <= cpu_matvec.MAX_ROWS_SHARED)
               and not batch_invariant and not self.fmt.kernel_for_few_rows)
        if not few and cpu_matvec.usable(self.method, x_P1K):
            return self.kernel_matvec(x_P1K.reshape(P, x_P1K.shape[-1]), index_P)
        if not torch.compiler.is_compiling():
            return pairs_bmm(self, index_P, x_P1K)
        return formats.fused_matvec(self.method, self.fused_inputs(index_P), materialized(x_P1K))

    def kernel_matvec(self, x_RK: torch.Tensor, index_R: Optional[torch.Tensor]) -> torch.Tensor:
        """y (R, N) by the C kernel (cpu_matvec.py): row r against this weight, or against weight index_R[r]
        of a stack (..., N, K); x is padded to whole blocks here."""
        return cpu_matvec.qmatvec(self.method, self.fmt.pad(x_RK), self.qweight, self.kernel_scale, index_R)

    @property
    def kernel_scale(self) -> torch.Tensor:
        """The scales the C kernel reads: the float32 mirror where the format keeps one, else the stored ones
        (mxfp4's E8M0 bytes)."""
        return self.scale_f32 if "scale" in self.fmt.float_copies else self.scale

    def x8_matvec(self, x_RK: torch.Tensor, index_R: Optional[torch.Tensor]) -> torch.Tensor:
        """y (R, N) with x quantized to 8 bits per block (activations.py): the C kernel over the repacked
        panels where usable (float32 x on CPU), else the same math in torch (`fake_quantize_x8`, then a
        float product)."""
        if self.x8_panels is not None and cpu_matvec.usable(self.method, x_RK):
            x_RK = self.fmt.pad(x_RK)
            return cpu_matvec.x8matvec(self.method, x_RK, self.x8_panels, self.x8_scale, self.shape[-2], index_R)
        xq_RK = activations.fake_quantize_x8(x_RK)
        if index_R is None:
            return F.linear(xq_RK, self.dense(dtype=x_RK.dtype))
        return (self.dense(index_R, x_RK.dtype) * xq_RK[:, None]).sum(-1)

    def fused_inputs(self, index=None) -> formats.Packed:
        """`packed(index)` plus the float32 mirrors the fused matvec reads."""
        tensors = self.packed(index)
        for name in self.fmt.float_copies:
            copy = getattr(self, name + "_f32")
            tensors[name + "_f32"] = copy if index is None else copy[index]
        return tensors

    def extra_repr(self) -> str:
        x8 = f", activations={self.activations!r}" if self.rowwise_only else ""
        return f"method={self.method!r}, shape={tuple(self.shape)}, bits_per_weight={self.bits_per_weight():.3f}{x8}"


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
        return self.weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
