"""OCP Microscaling (MX v1.0) block formats along the last dim: `block` (32) elements share one E8M0
scale 2**(s - 127) (s = 255: NaN). Elements are E2M1 (MXFP4), E4M3 or E5M2 (MXFP8).

Scale rule (spec section 6.3): shared exponent = floor(log2(amax of the block)) - emax_elem, clamped to
[-127, 127] (emax_elem: 2 for E2M1, 8 for E4M3, 15 for E5M2); an all-zero block gets -127; a block
holding inf or NaN gets the NaN scale. Elements are x / 2**shared_exp rounded to the element format,
saturating at its largest value (a block's amax lands in [2**emax, 2**(emax+1)), which for E2M1 is
[4, 8): values above 6 clip).

Codes: E2M1 as uint8 0..15 (bit 3 sign, bits 0-2 the magnitude code of 0, .5, 1, 1.5, 2, 3, 4, 6),
two per byte with `pack_e2m1` (element 2j in the low nibble: gpt-oss's `*_blocks`); E4M3 / E5M2 as
torch's float8 dtypes.

Legend: K the last dim (a multiple of block), G = K / block groups.
"""

from __future__ import annotations

import torch

from .formats import TORCH_DTYPES, check_rounding, decode, encode, fp_round, get_format, pad_last

SCALE_BIAS = 127
SCALE_NAN = 255


def block_exponents(x_GB: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """The shared exponent of each block (rows of the last dim) as int32; NaN blocks get SCALE_NAN - 127."""
    amax_G = x_GB.abs().amax(dim=-1)
    finite_G = torch.isfinite(amax_G)
    _, ex_G = torch.frexp(torch.where(finite_G, amax_G, 0.0))  # amax = m * 2**ex, m in [0.5, 1)
    exp_G = torch.where(amax_G > 0, ex_G - 1 - emax_elem, -SCALE_BIAS).clamp(-SCALE_BIAS, SCALE_BIAS)
    return torch.where(finite_G, exp_G, SCALE_NAN - SCALE_BIAS)


def mx_quantize(x: torch.Tensor, elem: str = "e2m1", block: int = 32, rounding: str = "nearest", generator=None):
    """(codes, scales) of x along its last dim (its size a multiple of `block`); see the module doc."""
    fmt = get_format(elem)
    check_rounding(rounding)
    K = x.shape[-1]
    if block <= 0 or K % block:
        raise ValueError(f"mx_quantize: last dim {K} is not a multiple of the block size {block}")
    x_GB = x.float().reshape(*x.shape[:-1], K // block, block)
    exp_G = block_exponents(x_GB, fmt.emax)
    scaled_GB = torch.ldexp(x_GB, -exp_G[..., None])
    scaled_GB = torch.where((exp_G == SCALE_NAN - SCALE_BIAS)[..., None], 0.0, scaled_GB)
    codes = encode(scaled_GB, fmt, rounding, generator).reshape(x.shape)
    if elem in TORCH_DTYPES:
        codes = codes.view(TORCH_DTYPES[elem])
    return codes, (exp_G + SCALE_BIAS).to(torch.uint8)


def mx_dequantize(codes: torch.Tensor, scales: torch.Tensor, elem: str = "e2m1", block: int = 32,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    fmt = get_format(elem)
    K = codes.shape[-1]
    if K != scales.shape[-1] * block:
        raise ValueError(f"mx_dequantize: {K} elements do not match {scales.shape[-1]} scales of block {block}")
    values = decode(codes.view(torch.uint8), fmt)
    v_GB = values.reshape(*codes.shape[:-1], K // block, block)
    s_G = scales.to(torch.int32)
    out_GB = torch.ldexp(v_GB, (s_G - SCALE_BIAS)[..., None])
    out_GB = torch.where((s_G == SCALE_NAN)[..., None], float("nan"), out_GB)
    return out_GB.reshape(codes.shape).to(dtype)


def mx_fake_quant(x: torch.Tensor, elem: str = "e2m1", block: int = 32, rounding: str = "nearest",
                  generator=None, prescale: float = 1.0) -> torch.Tensor:
    """Quantise and dequantise along the last dim (float32); a ragged tail is zero-padded to a block.

    prescale: the elements are rounded as x * prescale over the scale of x itself, then divided by it
    (3/4 with stochastic rounding: a block's max lands in [3, 6) for E2M1 and never clips)."""
    fmt = get_format(elem)
    K = x.shape[-1]
    xp = pad_last(x.float(), block)
    x_GB = xp.reshape(*xp.shape[:-1], xp.shape[-1] // block, block)
    exp_G1 = block_exponents(x_GB, fmt.emax)[..., None]  # same values as mx_dequantize(*mx_quantize(...))
    out_GB = torch.ldexp(fp_round(torch.ldexp(x_GB * prescale, -exp_G1), fmt, rounding, generator), exp_G1)
    if prescale != 1.0:
        out_GB = out_GB / prescale
    out_GB = torch.where(exp_G1 == SCALE_NAN - SCALE_BIAS, float("nan"), out_GB)
    out = out_GB.reshape(xp.shape)
    return out[..., :K] if out.shape[-1] != K else out


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2n) codes 0..15 -> uint8 (..., n): element 2j in the low nibble, 2j+1 in the high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1 needs an even last dim, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) -> codes (..., 2n), the inverse of pack_e2m1."""
    p = packed.view(torch.uint8)
    return torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
