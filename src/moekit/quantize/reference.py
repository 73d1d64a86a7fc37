"""The plain-Python oracle for `formats` (it never calls the vectorised code, which tests compare
against it byte for byte): one group (int8: one row) quantized value by value, each step a
correctly rounded float32 operation as in the C code, returning the group's bytes:

  int8     [fp32 s][K x int8]            (one row)
  q8_0     [fp16 d][32 x int8]           = GGML block_q8_0
  q4_0     [fp16 d][16 bytes]            = GGML block_q4_0
  int4-gG  [fp16 s][fp16 m][G/2 bytes]   (4-bit: byte j = element j (low nibble), j + G/2 (high))
  mxfp4    [E8M0 s][16 bytes]            (E2M1: byte j = element 2j (low nibble), 2j + 1 (high))

mxfp4 follows the OCP MX v1.0 spec from its text (not moekit.lowp's code): s = floor(log2(amax))
- 2 + 127 (2: E2M1's largest exponent), 0 for an all-zero group; each value / 2**(s - 127)
rounded to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (ties to the even code, above 6 to 6).

Inputs must be float32-representable and the group complete (padded).
"""

from __future__ import annotations

import math
import struct
from typing import List, Sequence, Tuple


def _f32(v: float) -> float:
    """Round a Python float to float32."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _f16(v: float) -> float:
    return struct.unpack("<e", struct.pack("<e", v))[0]


def _roundf(v: float) -> float:
    """C's roundf: halves go away from zero."""
    return math.copysign(math.floor(abs(v) + 0.5), v)


def _nibble_bytes(q: List[int]) -> bytes:
    half = len(q) // 2
    return bytes(q[j] | (q[j + half] << 4) for j in range(half))


def _nibbles(data: bytes) -> List[int]:
    return [b & 15 for b in data] + [b >> 4 for b in data]


def _int8_codes(values: Sequence[float]) -> Tuple[float, bytes]:
    """d = max|x| / 127 (float32) and the codes clamp(roundf(x * (1/d)), -127, 127) (0 when d = 0)."""
    x = [_f32(v) for v in values]
    d = _f32(max(abs(v) for v in x) / 127.0)
    inv = _f32(1.0 / d) if d else 0.0
    return d, struct.pack(f"<{len(x)}b", *(int(max(-127, min(127, _roundf(_f32(v * inv))))) for v in x))


def quantize_int8_row(values: Sequence[float]) -> bytes:
    d, qs = _int8_codes(values)
    return struct.pack("<f", d) + qs


def dequantize_int8_row(data: bytes) -> List[float]:
    (s,) = struct.unpack_from("<f", data)
    return [_f32(q * s) for q in struct.unpack_from(f"<{len(data) - 4}b", data, 4)]


def quantize_q8_0_block(values: Sequence[float]) -> bytes:  # llama.cpp quantize_row_q8_0_ref
    d, qs = _int8_codes(values)  # the codes use the float32 d; the fp16 d is what is stored
    return struct.pack("<e", _f16(d)) + qs


def dequantize_q8_0_block(data: bytes) -> List[float]:
    (d,) = struct.unpack_from("<e", data)
    return [_f32(q * d) for q in struct.unpack_from(f"<{len(data) - 2}b", data, 2)]


def quantize_q4_0_block(values: Sequence[float]) -> bytes:  # llama.cpp quantize_row_q4_0_ref
    x = [_f32(v) for v in values]
    amax, vmax = 0.0, 0.0
    for v in x:  # the first value of largest magnitude, sign kept
        if amax < abs(v):
            amax, vmax = abs(v), v
    d = _f32(vmax / -8.0)
    inv = _f32(1.0 / d) if d else 0.0
    q = [min(15, int(_f32(_f32(v * inv) + 8.5))) for v in x]
    return struct.pack("<e", _f16(d)) + _nibble_bytes(q)


def dequantize_q4_0_block(data: bytes) -> List[float]:
    (d,) = struct.unpack_from("<e", data)
    return [_f32((v - 8) * d) for v in _nibbles(data[2:])]


def quantize_affine_int4_group(values: Sequence[float]) -> bytes:
    x = [_f32(v) for v in values]
    mn, mx = min(x), max(x)
    s, m = _f16(_f32(_f32(mx - mn) / 15.0)), _f16(mn)  # the codes use the fp16-rounded pair
    inv = _f32(1.0 / s) if s else 0.0
    q = [max(0, min(15, math.floor(_f32(_f32(_f32(v - m) * inv) + 0.5)))) for v in x]
    return struct.pack("<ee", s, m) + _nibble_bytes(q)


E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # code & 7; bit 3 is the sign


def _e2m1_code(v: float) -> int:
    a = min(abs(v), 6.0)
    code = min(range(8), key=lambda c: (abs(a - E2M1_MAGNITUDES[c]), c % 2))  # nearest, ties to even
    return code | (8 if math.copysign(1.0, v) < 0 else 0)


def quantize_mxfp4_group(values: Sequence[float]) -> bytes:
    x = [_f32(v) for v in values]
    amax = max(abs(v) for v in x)
    exp = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
    q = [_e2m1_code(v / 2.0 ** exp) for v in x]
    return bytes([exp + 127]) + bytes(q[2 * j] | (q[2 * j + 1] << 4) for j in range(len(q) // 2))


def dequantize_mxfp4_group(data: bytes) -> List[float]:
    if data[0] == 255:
        return [math.nan] * (2 * (len(data) - 1))
    scale = 2.0 ** (data[0] - 127)
    codes = [c for b in data[1:] for c in (b & 15, b >> 4)]
    return [_f32((-1.0 if c & 8 else 1.0) * E2M1_MAGNITUDES[c & 7] * scale) for c in codes]


def dequantize_affine_int4_group(data: bytes) -> List[float]:
    s, m = struct.unpack_from("<ee", data)
    return [_f32(_f32(v * s) + m) for v in _nibbles(data[4:])]
