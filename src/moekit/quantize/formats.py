"""Weight-only quantization formats: vectorised pack/unpack, and a plain per-block reference.

Every format quantizes a weight (..., N, K) along its LAST dim K (the input / reduction
dim of `F.linear` and of the expert matmuls), in groups of G consecutive values:

  method     group G      stored per group                       value                    bits/weight
  int8       K (a row)    fp32 scale s = max|w| / 127            q * s, q in [-127, 127]   8 + 32/K
  int4-gG    32, 64, 128  fp16 scale s = (max - min) / 15,       q * s + m, q in [0, 15]   4 + 32/G
                          fp16 offset m = min (asymmetric)                                 (5, 4.5, 4.25)
  q8_0       32           fp16 d = max|w| / 127                  q * d, q int8             8.5
  q4_0       32           fp16 d = w* / -8, w* the value of      (q - 8) * d, q in [0, 15] 4.5
                          largest magnitude (sign kept)

q8_0 and q4_0 are llama.cpp/GGML's Q8_0 and Q4_0 and reproduce `quantize_row_q8_0_ref` /
`quantize_row_q4_0_ref` bit for bit: q8_0 rounds half away from zero; q4_0 computes
q = min(15, trunc(w * (1/d) + 8.5)). int4-gG is asymmetric (a Q4_1-like scale and minimum)
with q = clamp(round((w - m) / s), 0, 15) computed from the fp16-rounded s and m, so the
stored pair is the one the rounding used. Arithmetic is float32 (1/d then a multiply, as
llama.cpp does); a scale of 0 (an all-zero group) gives q = 0 (q4_0: q = 8).

Storage (struct of arrays, the tensors a `QuantizedWeight` registers as buffers):
  qweight  int8 (..., Kp) for int8/q8_0; uint8 (..., Kp/2) for int4/q4_0, two values per byte
  scale    int16 (..., Kp/G) = the raw bits of fp16 scales; int8: int32 (..., 1) = raw fp32 bits
  offset   int16 (..., Kp/G) = raw fp16 bits (int4-gG only)
Scales are kept as integer bit patterns so that `model.to(dtype)` / `.half()` never re-round
them. 4-bit nibble order, both 4-bit formats as GGML: byte j of a group holds element j in
its low nibble and element j + G/2 in its high nibble, so each half of a group is a run of
contiguous bytes (a fused reduction then reads packed bytes and activations with unit stride);
[fp16 d bytes, 16 qs bytes] per block is exactly GGML's `block_q4_0` (and [d, 32 qs] is
`block_q8_0`).
Padding: when K is not a multiple of G, each row is zero-padded to Kp = ceil(K/G)*G before
quantizing and the padding is cut off when dequantizing (it costs (Kp - K) stored values).

Functions: `quantize` / `dequantize` (vectorised, no host syncs: they also run on meta),
`fused_matvec` (x @ Wᵀ straight from the packed codes, for compiled decoding), and the plain
per-group reference `reference_quantize_group` / `reference_dequantize_group` (Python floats
rounded to float32 step by step; bytes in the layouts above) that tests compare against.

Legend: K the quantized (last) dim, Kp K padded to the group, G group size, NB groups per row.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

Packed = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Format:
    name: str
    group: int  # values per scale; 0 = one scale per row (int8)
    bits: int  # 8 or 4
    has_offset: bool = False

    def group_size(self, K: int) -> int:
        return self.group or K

    def padded(self, K: int) -> int:
        G = self.group_size(K)
        return -(-K // G) * G

    def bits_per_weight(self, K: int) -> float:
        """Stored bits per original weight of a row of K values (padding included)."""
        G, Kp = self.group_size(K), self.padded(K)
        scale_bits = 32 if self.group == 0 else 16 * (2 if self.has_offset else 1)
        return (Kp * self.bits + (Kp // G) * scale_bits) / K


FORMATS = {
    "int8": Format("int8", 0, 8),
    "int4-g32": Format("int4-g32", 32, 4, has_offset=True),
    "int4-g64": Format("int4-g64", 64, 4, has_offset=True),
    "int4-g128": Format("int4-g128", 128, 4, has_offset=True),
    "q8_0": Format("q8_0", 32, 8),
    "q4_0": Format("q4_0", 32, 4),
}
METHODS = tuple(FORMATS)


def get_format(method: str) -> Format:
    if method not in FORMATS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {list(METHODS)}")
    return FORMATS[method]


# ---------------------------------------------------------------------------- vectorised
def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round goes to even)."""
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _fp16_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.int16)


def _pack_pairs(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo.to(torch.uint8) | (hi.to(torch.uint8) << 4)).to(torch.uint8)


def quantize(method: str, w: torch.Tensor) -> Packed:
    """Quantize w (..., K) along its last dim: the storage tensors of the module docstring.

    No host syncs and no data-dependent shapes, so it also runs on the meta device
    (which is how a quantized checkpoint's module skeleton is built before loading).
    """
    fmt = get_format(method)
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(f"cannot quantize a tensor of shape {tuple(w.shape)}: the last dim must be non-empty")
    lead, K = w.shape[:-1], w.shape[-1]
    x = w.detach().to(torch.float32)
    Kp = fmt.padded(K)
    if Kp != K:
        x = F.pad(x, (0, Kp - K))
    if fmt.name == "int8":
        s = x.abs().amax(-1, keepdim=True) / 127.0
        q = _round_half_away(x * _safe_inverse(s)).clamp(-127, 127)
        return {"qweight": q.to(torch.int8), "scale": s.view(torch.int32)}
    G = fmt.group
    x_bg = x.reshape(*lead, Kp // G, G)
    if fmt.name == "q8_0":
        d = x_bg.abs().amax(-1) / 127.0
        q = _round_half_away(x_bg * _safe_inverse(d)[..., None])
        return {"qweight": q.to(torch.int8).reshape(*lead, Kp), "scale": _fp16_bits(d)}
    if fmt.name == "q4_0":
        idx = x_bg.abs().argmax(-1, keepdim=True)  # first of equal magnitudes, as llama.cpp's strict '<'
        vmax = x_bg.gather(-1, idx).squeeze(-1)
        vmax = torch.where(vmax == 0, torch.zeros_like(vmax), vmax)  # llama.cpp starts from +0.0
        d = vmax / -8.0
        q = torch.trunc(x_bg * _safe_inverse(d)[..., None] + 8.5).clamp(0, 15)
        packed = _pack_pairs(q[..., : G // 2], q[..., G // 2:])
        return {"qweight": packed.reshape(*lead, Kp // 2), "scale": _fp16_bits(d)}
    # int4-gG: asymmetric, from the fp16-rounded scale and offset
    mn, mx = x_bg.amin(-1), x_bg.amax(-1)
    s16 = ((mx - mn) / 15.0).to(torch.float16)
    m16 = mn.to(torch.float16)
    inv = _safe_inverse(s16.float())
    q = torch.floor((x_bg - m16.float()[..., None]) * inv[..., None] + 0.5).clamp(0, 15)
    packed = _pack_pairs(q[..., : G // 2], q[..., G // 2:])
    return {"qweight": packed.reshape(*lead, Kp // 2), "scale": s16.view(torch.int16),
            "offset": m16.view(torch.int16)}


def dequantize(method: str, packed: Packed, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (..., K) of `quantize`'s tensors (computed in float32, then cast to dtype)."""
    fmt = get_format(method)
    qw = packed["qweight"]
    if fmt.name == "int8":
        w = qw.float() * packed["scale"].view(torch.float32)
        return (w if w.shape[-1] == K else w[..., :K]).to(dtype)
    G = fmt.group
    scale = packed["scale"].view(torch.float16).float()  # (..., NB)
    lead, NB = scale.shape[:-1], scale.shape[-1]
    if fmt.bits == 8:
        q = qw.reshape(*lead, NB, G).float()
    else:
        b = qw.reshape(*lead, NB, G // 2)
        q = torch.cat([b & 15, b >> 4], dim=-1).float()
    if fmt.name == "q4_0":
        w = (q - 8.0) * scale[..., None]
    elif fmt.has_offset:
        w = q * scale[..., None] + packed["offset"].view(torch.float16).float()[..., None]
    else:
        w = q * scale[..., None]
    w = w.reshape(*lead, NB * G)
    return (w if NB * G == K else w[..., :K]).to(dtype)


def fused_matvec(method: str, packed: Packed, x: torch.Tensor) -> torch.Tensor:
    """sum_k W[..., n, k] * x[..., 0, k] -> (..., N) straight from the packed weight (..., N, K).

    x (..., 1, K) broadcasts against the weight's leading dims (a Linear: x (M, 1, K), weight
    (N, K); gathered experts: x (P, 1, K), weight (P, N, K)). Per group the integer codes are
    dotted with x and the scale (and offset * sum(x)) applied once per group, with the two
    nibble halves of each byte run as unit-stride sums. Written for torch.compile, which fuses
    it into one pass over the packed bytes; eagerly it builds (..., N, K) temporaries. Equals
    `x @ dequantize(...)ᵀ` up to float summation order (that is its reference).
    """
    fmt = get_format(method)
    qw, K = packed["qweight"], x.shape[-1]
    Kp = fmt.padded(K)
    if Kp != K:
        x = F.pad(x, (0, Kp - K))
    if fmt.name == "int8":
        return (qw * x).sum(-1) * packed["scale"].view(torch.float32)[..., 0].to(x.dtype)
    G, NB = fmt.group, Kp // fmt.group
    scale = packed["scale"].view(torch.float16).to(x.dtype)  # (..., N, NB)
    x_G = x.reshape(*x.shape[:-1], NB, G)  # (..., 1, NB, G)
    if fmt.bits == 8:
        return ((qw.reshape(*qw.shape[:-1], NB, G) * x_G).sum(-1) * scale).sum(-1)
    b = qw.reshape(*qw.shape[:-1], NB, G // 2)
    dot = ((b & 15) * x_G[..., : G // 2] + (b >> 4) * x_G[..., G // 2:]).sum(-1)  # (..., N, NB)
    if fmt.name == "q4_0":
        return ((dot - 8.0 * x_G.sum(-1)) * scale).sum(-1)
    offset = packed["offset"].view(torch.float16).to(x.dtype)
    return (dot * scale + offset * x_G.sum(-1)).sum(-1)


def packed_nbytes(packed: Packed) -> int:
    return sum(t.numel() * t.element_size() for t in packed.values())


# ---------------------------------------------------------------------------- plain reference
def _f32(v: float) -> float:
    """Round a Python float to float32 (each step below is a correctly rounded f32 op)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _f16(v: float) -> float:
    return struct.unpack("<e", struct.pack("<e", v))[0]


def _roundf(v: float) -> float:
    return math.copysign(math.floor(abs(v) + 0.5), v)


def reference_quantize_group(method: str, values: List[float]) -> bytes:
    """One group (int8: one row) as bytes, in plain Python: the oracle for `quantize`.

    Layouts: int8 = [fp32 s][K x int8]; q8_0 = GGML block_q8_0 [fp16 d][32 x int8];
    q4_0 = GGML block_q4_0 [fp16 d][16 bytes]; int4-gG = [fp16 s][fp16 m][G/2 bytes].
    Values must already be float32-representable and the group complete (padded).
    """
    fmt = get_format(method)
    x = [_f32(v) for v in values]
    if fmt.name in ("int8", "q8_0"):
        amax = max(abs(v) for v in x)
        d = _f32(amax / 127.0)
        dq = _f16(d) if fmt.name == "q8_0" else d
        inv = _f32(1.0 / d) if d else 0.0
        qs = [int(max(-127, min(127, _roundf(_f32(v * inv))))) for v in x]
        head = struct.pack("<e", dq) if fmt.name == "q8_0" else struct.pack("<f", d)
        return head + struct.pack(f"<{len(qs)}b", *qs)
    if fmt.name == "q4_0":
        amax, vmax = 0.0, 0.0
        for v in x:
            if amax < abs(v):
                amax, vmax = abs(v), v
        d = _f32(vmax / -8.0)
        inv = _f32(1.0 / d) if d else 0.0
        q = [min(15, int(_f32(_f32(v * inv) + 8.5))) for v in x]
        half = len(x) // 2
        return struct.pack("<e", _f16(d)) + bytes(q[j] | (q[j + half] << 4) for j in range(half))
    mn, mx = min(x), max(x)
    s, m = _f16(_f32(_f32(mx - mn) / 15.0)), _f16(mn)
    inv = _f32(1.0 / s) if s else 0.0
    q = [max(0, min(15, math.floor(_f32(_f32(_f32(v - m) * inv) + 0.5)))) for v in x]
    half = len(x) // 2
    return struct.pack("<ee", s, m) + bytes(q[j] | (q[j + half] << 4) for j in range(half))


def reference_dequantize_group(method: str, data: bytes) -> List[float]:
    """Inverse of `reference_quantize_group`: the group's values (float32-rounded)."""
    fmt = get_format(method)
    if fmt.name == "int8":
        (s,) = struct.unpack_from("<f", data)
        return [_f32(q * s) for q in struct.unpack_from(f"<{len(data) - 4}b", data, 4)]
    if fmt.name == "q8_0":
        (d,) = struct.unpack_from("<e", data)
        return [_f32(q * d) for q in struct.unpack_from("<32b", data, 2)]
    if fmt.name == "q4_0":
        (d,) = struct.unpack_from("<e", data)
        qs = data[2:]
        q = [b & 15 for b in qs] + [b >> 4 for b in qs]
        return [_f32((v - 8) * d) for v in q]
    s, m = struct.unpack_from("<ee", data)
    q = [b & 15 for b in data[4:]] + [b >> 4 for b in data[4:]]
    return [_f32(_f32(v * s) + m) for v in q]


def packed_group_bytes(method: str, packed: Packed, row: int, group: int) -> bytes:
    """The bytes of one group of a vectorised result (row-major over the leading dims), in the
    `reference_quantize_group` layout, for comparing the two implementations."""
    fmt = get_format(method)
    qw = packed["qweight"].reshape(-1, packed["qweight"].shape[-1])[row]
    if fmt.name == "int8":
        return packed["scale"].reshape(-1)[row].numpy().tobytes() + qw.numpy().tobytes()
    G = fmt.group
    per = G if fmt.bits == 8 else G // 2
    scale = packed["scale"].reshape(-1, packed["scale"].shape[-1])[row, group]
    out = scale.numpy().tobytes()
    if fmt.has_offset:
        out += packed["offset"].reshape(-1, packed["offset"].shape[-1])[row, group].numpy().tobytes()
    return out + qw[group * per:(group + 1) * per].numpy().tobytes()
