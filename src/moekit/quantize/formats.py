"""Weight-only quantization formats: one class per format family, each with vectorised pack/unpack,
a fused matvec, its byte count and its plain per-group reference (reference.py). Adding a format:
docs/extending.md ("A quantization format"); how a model uses them: docs/architecture.md.

Every format quantizes a weight (..., N, K) along its LAST dim K (the reduction dim of `F.linear`
and of the expert matmuls), in groups of G consecutive values:

  class       method     group G      stored per group                       value                    bits/weight
  RowInt8     int8       K (a row)    fp32 scale s = max|w| / 127            q * s, q in [-127, 127]   8 + 32/K
  AffineInt4  int4-gG    32, 64, 128  fp16 scale s = (max - min) / 15,       q * s + m, q in [0, 15]   4 + 32/G
                                      fp16 offset m = min (asymmetric)                                 (5, 4.5, 4.25)
  Q8_0        q8_0       32           fp16 d = max|w| / 127                  q * d, q int8             8.5
  Q4_0        q4_0       32           fp16 d = w* / -8, w* the value of      (q - 8) * d, q in [0, 15] 4.5
                                      largest magnitude (sign kept)
  MXFP4       mxfp4      32           E8M0 scale 2**(s - 127), s = floor(    e2m1(q) * 2**(s - 127)    4.25
                                      log2 max|w|) - 2 + 127 (OCP MX v1.0)   (q an E2M1 code)

q8_0 and q4_0 reproduce llama.cpp's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` bit for bit:
q8_0 rounds half away from zero; q4_0 computes q = min(15, trunc(w * (1/d) + 8.5)). int4-gG
computes q = clamp(round((w - m) / s), 0, 15) from the fp16-rounded s and m (the stored pair).
Arithmetic is float32 (1/d then a multiply, as llama.cpp); a scale of 0 gives q = 0 (q4_0: 8).
mxfp4 is moekit.lowp.mx's codec (E2M1 round to nearest even, saturating at 6; an all-zero group
gets s = 0): the format gpt-oss ships its experts in, which `QuantizedWeight.from_mxfp4_blocks`
(modules.py) adopts bit for bit.

Storage (struct of arrays, the buffers of a `QuantizedWeight`):
  qweight  int8 (..., Kp) for int8/q8_0; uint8 (..., Kp/2) for int4/q4_0, two values per byte
  scale    int16 (..., Kp/G) = the raw bits of fp16 scales; int8: int32 (..., 1) = raw fp32 bits;
           mxfp4: uint8 (..., Kp/32) E8M0 biased exponents (gpt-oss's `*_scales`)
  offset   int16 (..., Kp/G) = raw fp16 bits (int4-gG only)
Scales are integer bit patterns so that `model.to(dtype)` never re-rounds them. 4-bit codes (GGML
order): byte j of a group holds element j in its low nibble and element j + G/2 in its high one,
so [fp16 d, 16 bytes] per block is GGML's `block_q4_0` (and [d, 32 int8] `block_q8_0`). mxfp4
packs in gpt-oss order instead: byte j holds element 2j (low nibble) and 2j + 1 (high), so qweight
(..., N, Kp/2) is gpt-oss's `*_blocks` (..., N, Kp/32, 16) with the last two dims merged. Rows are
zero-padded to Kp = ceil(K/G)*G; dequantizing cuts the padding. `FORMATS` maps method names to
instances; `row_nbytes` / `bits_per_weight` are the one table of storage cost (moekit.analyze).

Legend: K the quantized (last) dim, Kp K padded to whole groups, G group size, H = G/2 bytes of
a 4-bit group, B = NB groups per row, N output rows (fused matvec), 1 a broadcast dim.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..lowp.formats import E2M1, decode as decode_e2m1
from ..lowp.mx import SCALE_NAN, mx_dequantize, mx_quantize, pack_e2m1, unpack_e2m1
from . import reference

Packed = Dict[str, torch.Tensor]


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round goes to even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


class Format:
    """A weight-only format: storage cost, and the quantize / dequantize / fused_matvec entry points,
    which call a subclass's hooks `encode` / `decode` / `matvec` on padded values (the hooks, the
    class attributes and the plain reference a subclass gives: docs/extending.md, "A quantization
    format"). `layout` is `layout_text` with {G} (group size) and {nbytes} (bytes of a group) filled in.
    """

    bits, scale_bits = 0, 0
    group_tensors: Tuple[str, ...] = ("scale",)
    float_copies: Tuple[str, ...] = ()  # per-group tensors a QuantizedWeight mirrors in float32 (`float_copy`)
    # compiled on CPU, the C kernel (moekit/cpu_matvec.c) even for one row or few expert pairs, where the fused
    # loop of `matvec` is slow (mxfp4: a table lookup per value, which inductor does not vectorise)
    kernel_for_few_rows = False
    layout_text: str = ""

    def float_copy(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        """The float32 values of the per-group tensor `name` from its stored bits (here fp16 bits as int16)."""
        return raw.view(torch.float16).float()

    def float_group(self, packed: Packed, name: str) -> torch.Tensor:
        """The per-group tensor `name` in float32: the QuantizedWeight's mirror `<name>_f32` where `packed`
        has it (inductor vectorises a loop over float32 scales; an in-loop bit-cast runs scalar)."""
        copy = packed.get(name + "_f32")
        return copy if copy is not None else self.float_copy(name, packed[name])

    def __init__(self, name: str, group: int):
        self.name = name
        self.group = group  # values per scale; 0 = one scale per row (int8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    @property
    def layout(self) -> str:
        """One line describing what is stored (for listings)."""
        if not self.group:
            return self.layout_text
        return self.layout_text.format(G=self.group, nbytes=self.row_nbytes(self.group))

    # -- storage cost (the single table of bytes per weight)
    def group_size(self, K: int) -> int:
        return self.group or K

    def padded(self, K: int) -> int:
        G = self.group_size(K)
        return -(-K // G) * G

    def row_bits(self, K: int) -> int:
        """Stored bits of one row of K values: codes (padding included) and scales."""
        Kp = self.padded(K)
        return Kp * self.bits + (Kp // self.group_size(K)) * self.scale_bits

    def row_nbytes(self, K: int) -> int:
        """Stored bytes of one row of K values (what `quantize` allocates per row)."""
        return self.row_bits(K) // 8

    def bits_per_weight(self, K: int) -> float:
        """Stored bits per original weight of a row of K values (padding included)."""
        return self.row_bits(K) / K

    # -- entry points
    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) zero-padded to (..., Kp)."""
        K, Kp = x.shape[-1], self.padded(x.shape[-1])
        return x if Kp == K else F.pad(x, (0, Kp - K))

    def quantize(self, w: torch.Tensor) -> Packed:
        """Quantize w (..., K) along its last dim: the storage tensors of the module docstring. No host
        syncs, no data-dependent shapes: it runs on the meta device (`load_model` builds skeletons so)."""
        if w.dim() < 1 or w.shape[-1] == 0:
            raise ValueError(f"cannot quantize a tensor of shape {tuple(w.shape)}: the last dim must be non-empty")
        return self.encode(self.pad(w.detach().to(torch.float32)))

    def dequantize(self, packed: Packed, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (..., K) of `quantize`'s tensors (computed in float32, then cast to dtype)."""
        return self.decode(packed)[..., :K].to(dtype)

    def fused_matvec(self, packed: Packed, x: torch.Tensor) -> torch.Tensor:
        """sum_k W[..., n, k] * x[..., 0, k] -> (..., N) straight from the packed weight (..., N, K); x
        (..., 1, K) broadcasts against its leading dims (a Linear: x (M, 1, K), weight (N, K); gathered
        experts: x (P, 1, K), weight (P, N, K)). The codes are dotted with x and the scale (and offset *
        sum(x)) applied once per group; torch.compile fuses it into one pass over the packed bytes.
        Equals `x @ dequantize(...)ᵀ` up to summation order."""
        return self.matvec(packed, self.pad(x))


class RowInt8(Format):
    """Symmetric int8 with one fp32 scale per row; reference layout [fp32 s][K x int8]."""

    bits, scale_bits = 8, 32
    layout_text = "int8 codes, one fp32 scale per row (output channel)"
    reference_quantize_group = staticmethod(reference.quantize_int8_row)
    reference_dequantize_group = staticmethod(reference.dequantize_int8_row)

    def encode(self, x_K: torch.Tensor) -> Packed:
        s_1 = x_K.abs().amax(-1, keepdim=True) / 127.0
        q_K = _round_half_away(x_K * _safe_inverse(s_1)).clamp(-127, 127)
        return {"qweight": q_K.to(torch.int8), "scale": s_1.view(torch.int32)}

    def decode(self, packed: Packed) -> torch.Tensor:
        return packed["qweight"].float() * packed["scale"].view(torch.float32)

    def matvec(self, packed: Packed, x_1K: torch.Tensor) -> torch.Tensor:
        s_N = packed["scale"].view(torch.float32)[..., 0].to(x_1K.dtype)
        return (packed["qweight"] * x_1K).sum(-1) * s_N


class GroupFormat(Format):
    """A fp16 scale (as raw int16 bits) per group of G consecutive values of a row. Subclasses give
    `encode_groups(x_BG)` -> (float codes q_BG, the per-group tensors), `values(q_BG, s_B, packed)`
    (codes -> floats) and `group_terms(packed, x_1BG, s_NB1)` (the (..., N, B, G) products whose sum is
    `fused_matvec`). Codes are int8 bytes here; NibbleFormat overrides `pack_codes` / `unpack_codes`.
    """

    def encode(self, x_Kp: torch.Tensor) -> Packed:
        lead, Kp, G = x_Kp.shape[:-1], x_Kp.shape[-1], self.group
        q_BG, per_group = self.encode_groups(x_Kp.reshape(*lead, Kp // G, G))
        return {"qweight": self.pack_codes(q_BG).reshape(*lead, Kp * self.bits // 8), **per_group}

    def decode(self, packed: Packed) -> torch.Tensor:
        s_B = packed["scale"].view(torch.float16).float()
        lead, NB = s_B.shape[:-1], s_B.shape[-1]
        q_BG = self.unpack_codes(packed["qweight"], lead, NB).float()
        return self.values(q_BG, s_B, packed).reshape(*lead, NB * self.group)

    float_copies = ("scale",)

    def matvec(self, packed: Packed, x_1Kp: torch.Tensor) -> torch.Tensor:
        """One reduction over (B, G) per output: each code times x times its group's float32 scale. Read
        from `<name>_f32` when `packed` has it (QuantizedWeight keeps float32 copies: inductor vectorises
        that loop over G, while an in-loop fp16 bit-cast runs scalar)."""
        G = self.group
        x_1BG = x_1Kp.reshape(*x_1Kp.shape[:-1], x_1Kp.shape[-1] // G, G)
        terms_NBG = self.group_terms(packed, x_1BG, self.float_group(packed, "scale")[..., None])
        return terms_NBG.sum((-2, -1)).to(x_1Kp.dtype)

    def pack_codes(self, q_BG: torch.Tensor) -> torch.Tensor:
        return q_BG.to(torch.int8)

    def unpack_codes(self, qweight: torch.Tensor, lead: torch.Size, NB: int) -> torch.Tensor:
        return qweight.reshape(*lead, NB, self.group)



class Q8_0(GroupFormat):
    """llama.cpp/GGML Q8_0: blocks of 32 int8 codes and a fp16 d = max|w| / 127 (block_q8_0)."""

    bits, scale_bits = 8, 16
    layout_text = "GGML block_q8_0: fp16 d + {G} int8 = {nbytes} bytes"
    reference_quantize_group = staticmethod(reference.quantize_q8_0_block)
    reference_dequantize_group = staticmethod(reference.dequantize_q8_0_block)

    def encode_groups(self, x_BG: torch.Tensor) -> Tuple[torch.Tensor, Packed]:
        d_B = x_BG.abs().amax(-1) / 127.0
        q_BG = _round_half_away(x_BG * _safe_inverse(d_B)[..., None])
        return q_BG, {"scale": d_B.to(torch.float16).view(torch.int16)}

    def values(self, q_BG: torch.Tensor, s_B: torch.Tensor, packed: Packed) -> torch.Tensor:
        return q_BG * s_B[..., None]

    def group_terms(self, packed: Packed, x_1BG: torch.Tensor, s_NB1: torch.Tensor) -> torch.Tensor:
        q_NBG = packed["qweight"].reshape(*packed["qweight"].shape[:-1], x_1BG.shape[-2], self.group)
        return q_NBG * x_1BG * s_NB1


class NibbleFormat(GroupFormat):
    """4-bit codes, two per byte in GGML order: byte j of a group = element j (low nibble) and
    element j + G/2 (high nibble)."""

    bits = 4

    def pack_codes(self, q_BG: torch.Tensor) -> torch.Tensor:
        H = self.group // 2
        return (q_BG[..., :H].to(torch.uint8) | (q_BG[..., H:].to(torch.uint8) << 4)).to(torch.uint8)

    def unpack_codes(self, qweight: torch.Tensor, lead: torch.Size, NB: int) -> torch.Tensor:
        b_BH = qweight.reshape(*lead, NB, self.group // 2)
        return torch.cat([b_BH & 15, b_BH >> 4], dim=-1)

    def nibbles(self, packed: Packed, x_1BG: torch.Tensor):
        """(low codes, high codes) (..., N, B, G/2) of the packed bytes: elements j and j + G/2 of a group
        (unpacked as int32: inductor's CPU vectors shift 32-bit lanes natively, bytes not)."""
        b_NBH = packed["qweight"].reshape(*packed["qweight"].shape[:-1], x_1BG.shape[-2], self.group // 2)
        b_NBH = b_NBH.to(torch.int32)
        return b_NBH & 15, b_NBH >> 4


class Q4_0(NibbleFormat):
    """llama.cpp/GGML Q4_0: blocks of 32 4-bit codes and a fp16 d = w* / -8 (block_q4_0)."""

    scale_bits = 16
    layout_text = "GGML block_q4_0: fp16 d + {G} 4-bit = {nbytes} bytes"
    reference_quantize_group = staticmethod(reference.quantize_q4_0_block)
    reference_dequantize_group = staticmethod(reference.dequantize_q4_0_block)

    def encode_groups(self, x_BG: torch.Tensor) -> Tuple[torch.Tensor, Packed]:
        idx_B1 = x_BG.abs().argmax(-1, keepdim=True)  # first of equal magnitudes, as llama.cpp's strict '<'
        vmax_B = x_BG.gather(-1, idx_B1).squeeze(-1)
        vmax_B = torch.where(vmax_B == 0, torch.zeros_like(vmax_B), vmax_B)  # llama.cpp starts from +0.0
        d_B = vmax_B / -8.0
        q_BG = torch.trunc(x_BG * _safe_inverse(d_B)[..., None] + 8.5).clamp(0, 15)
        return q_BG, {"scale": d_B.to(torch.float16).view(torch.int16)}

    def values(self, q_BG: torch.Tensor, s_B: torch.Tensor, packed: Packed) -> torch.Tensor:
        return (q_BG - 8.0) * s_B[..., None]

    def group_terms(self, packed: Packed, x_1BG: torch.Tensor, s_NB1: torch.Tensor) -> torch.Tensor:
        lo_NBH, hi_NBH = self.nibbles(packed, x_1BG)
        H = self.group // 2
        return ((lo_NBH - 8.0) * x_1BG[..., :H] + (hi_NBH - 8.0) * x_1BG[..., H:]) * s_NB1


class AffineInt4(NibbleFormat):
    """int4-gG: asymmetric 4-bit with a fp16 scale and a fp16 offset (the minimum) per group of G."""

    scale_bits = 32
    group_tensors = ("scale", "offset")
    layout_text = "4-bit codes, fp16 scale + fp16 offset per {G}"
    reference_quantize_group = staticmethod(reference.quantize_affine_int4_group)
    reference_dequantize_group = staticmethod(reference.dequantize_affine_int4_group)

    def __init__(self, group: int):
        super().__init__(f"int4-g{group}", group)

    def encode_groups(self, x_BG: torch.Tensor) -> Tuple[torch.Tensor, Packed]:
        mn_B, mx_B = x_BG.amin(-1), x_BG.amax(-1)
        s16_B = ((mx_B - mn_B) / 15.0).to(torch.float16)
        m16_B = mn_B.to(torch.float16)
        inv_B = _safe_inverse(s16_B.float())
        q_BG = torch.floor((x_BG - m16_B.float()[..., None]) * inv_B[..., None] + 0.5).clamp(0, 15)
        return q_BG, {"scale": s16_B.view(torch.int16), "offset": m16_B.view(torch.int16)}

    def values(self, q_BG: torch.Tensor, s_B: torch.Tensor, packed: Packed) -> torch.Tensor:
        return q_BG * s_B[..., None] + packed["offset"].view(torch.float16).float()[..., None]

    float_copies = ("scale", "offset")

    def group_terms(self, packed: Packed, x_1BG: torch.Tensor, s_NB1: torch.Tensor) -> torch.Tensor:
        lo_NBH, hi_NBH = self.nibbles(packed, x_1BG)
        H = self.group // 2
        x_lo, x_hi = x_1BG[..., :H], x_1BG[..., H:]
        m_NB1 = self.float_group(packed, "offset")[..., None]
        return (lo_NBH * x_lo + hi_NBH * x_hi) * s_NB1 + m_NB1 * (x_lo + x_hi)


class MXFP4(Format):
    """OCP MXFP4 (gpt-oss's expert weights): E2M1 codes two per byte (element 2j in the low nibble)
    and one E8M0 scale per 32 values; the codec is moekit.lowp.mx's. No float32 mirror: a scale s is
    2**(s - 127) built from its bits where it is read (`float_copy`; cpu_matvec.c's `block_scale`), exact,
    subnormal at s = 0, NaN at s = 255 as `mx_dequantize`."""

    bits, scale_bits = 4, 8
    kernel_for_few_rows = True
    layout_text = "OCP MXFP4: {G} E2M1 codes + one E8M0 scale = {nbytes} bytes (gpt-oss)"
    reference_quantize_group = staticmethod(reference.quantize_mxfp4_group)
    reference_dequantize_group = staticmethod(reference.dequantize_mxfp4_group)

    def encode(self, x_Kp: torch.Tensor) -> Packed:
        if x_Kp.is_meta:  # a skeleton to load into (load_model): the shapes only
            lead, Kp = x_Kp.shape[:-1], x_Kp.shape[-1]
            return {"qweight": x_Kp.new_empty(*lead, Kp // 2, dtype=torch.uint8),
                    "scale": x_Kp.new_empty(*lead, Kp // self.group, dtype=torch.uint8)}
        codes_Kp, scale_B = mx_quantize(x_Kp, "e2m1", self.group, "nearest")
        return {"qweight": pack_e2m1(codes_Kp), "scale": scale_B}

    def decode(self, packed: Packed) -> torch.Tensor:
        return mx_dequantize(unpack_e2m1(packed["qweight"]), packed["scale"], "e2m1", self.group)

    def float_copy(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        s = raw.to(torch.int32)
        bits = torch.where(s > 0, s << 23, 1 << 22)  # 2**(s - 127): the exponent field; s = 0: 2**-127, subnormal
        return torch.where(s == SCALE_NAN, 0x7FC00000, bits).view(torch.float32)

    def matvec(self, packed: Packed, x_1Kp: torch.Tensor) -> torch.Tensor:
        """Each group's codes dotted with x (even elements: low nibbles, odd: high), times 2**(s - 127)."""
        x_1BG = x_1Kp.reshape(*x_1Kp.shape[:-1], x_1Kp.shape[-1] // self.group, self.group)
        b_NBH = packed["qweight"].reshape(*packed["qweight"].shape[:-1], x_1BG.shape[-2], self.group // 2)
        b_NBH = b_NBH.to(torch.int32)  # (as NibbleFormat.nibbles)
        lo_NBH, hi_NBH = decode_e2m1(b_NBH & 15, E2M1, x_1Kp.dtype), decode_e2m1(b_NBH >> 4, E2M1, x_1Kp.dtype)
        dot_NB = (lo_NBH * x_1BG[..., 0::2] + hi_NBH * x_1BG[..., 1::2]).sum(-1)
        return (dot_NB * self.float_group(packed, "scale").to(x_1Kp.dtype)).sum(-1)


FORMATS: Dict[str, Format] = {fmt.name: fmt for fmt in (
    RowInt8("int8", 0), AffineInt4(32), AffineInt4(64), AffineInt4(128), Q8_0("q8_0", 32), Q4_0("q4_0", 32),
    MXFP4("mxfp4", 32))}
METHODS = tuple(FORMATS)


def get_format(method: str) -> Format:
    if method not in FORMATS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {list(METHODS)}")
    return FORMATS[method]


def packed_nbytes(packed: Packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


# -- by method name: look the format up and call its method of the same name
def quantize(method: str, w: torch.Tensor) -> Packed:
    return get_format(method).quantize(w)


def dequantize(method: str, packed: Packed, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return get_format(method).dequantize(packed, K, dtype)


def fused_matvec(method: str, packed: Packed, x: torch.Tensor) -> torch.Tensor:
    return get_format(method).fused_matvec(packed, x)


def reference_quantize_group(method: str, values: Sequence[float]) -> bytes:
    return get_format(method).reference_quantize_group(values)
