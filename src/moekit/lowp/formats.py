"""Low-precision float formats: FP8 E4M3 (fn: no inf, one NaN pattern) and E5M2 (IEEE-like), the MX
element E2M1 (FP4) and the E8M0 scale, as code <-> value maps; rounding to a format's grid by
round-to-nearest-even or stochastic rounding; FP8 with per-tensor, per-row, 1x128-tile and
128x128-block scales (DeepSeek-V3).

Rounding works on float32: |x| = y * 2**u with u = max(floor(log2|x|), emin) - mbits, y rounded to an
integer (torch.round is half-to-even; stochastic: floor(y + U[0,1))), so one rounding from float32,
as torch's own casts do. Overflow saturates to the largest finite value by default (torch's E4M3
cast does the same); with saturate=False it becomes inf (E5M2) or NaN (E4M3, E2M1 has neither:
it always saturates). Decoding reads a table built from the bit layout (tests compare it with torch's
dtypes and the OCP spec's value tables).

Legend: M rows, K the dim a scale runs along (the GEMM's reduction dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

ROUNDINGS = ("nearest", "stochastic")
SCALINGS = ("tensor", "row", "tile", "block")  # tile: 1 x TILE along the last dim; block: TILE x TILE
TILE = 128


@dataclass(frozen=True)
class FPFormat:
    name: str
    ebits: int
    mbits: int
    bias: int
    max: float  # largest finite value
    has_inf: bool
    nan_code: Optional[int]  # the positive NaN code; None: no NaN (E2M1)

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:  # exponent of the smallest normal
        return 1 - self.bias

    @property
    def emax(self) -> int:  # exponent of the largest binade (OCP MX's emax_elem)
        return math.floor(math.log2(self.max))

    def value(self, code: int) -> float:
        """The value of one code, from the bit layout."""
        sign = -1.0 if code >> (self.ebits + self.mbits) & 1 else 1.0
        mag = code & ((1 << (self.ebits + self.mbits)) - 1)
        if self.nan_code is not None and mag == self.nan_code:
            return float("nan")
        e, m = mag >> self.mbits, mag & ((1 << self.mbits) - 1)
        if self.has_inf and e == (1 << self.ebits) - 1:
            return sign * float("inf") if m == 0 else float("nan")
        if e == 0:
            return sign * m * 2.0 ** (self.emin - self.mbits)
        return sign * (1 + m / 2 ** self.mbits) * 2.0 ** (e - self.bias)


E4M3 = FPFormat("e4m3", 4, 3, 7, 448.0, False, 0x7F)
E5M2 = FPFormat("e5m2", 5, 2, 15, 57344.0, True, 0x7F)
E2M1 = FPFormat("e2m1", 2, 1, 1, 6.0, False, None)
FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}
TORCH_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def get_format(name: str) -> FPFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown element format {name!r}; choose one of {tuple(FORMATS)}")
    return FORMATS[name]


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")


@lru_cache(maxsize=None)
def cached_table(fmt: FPFormat, device: str) -> torch.Tensor:
    return torch.tensor([fmt.value(c) for c in range(1 << fmt.bits)], dtype=torch.float32, device=device)


def value_table(fmt: FPFormat, device=None) -> torch.Tensor:
    """Every code's value (float32, NaN and inf included), indexed by the code."""
    return cached_table(fmt, str(torch.device(device or "cpu")))


def fp_round(x: torch.Tensor, fmt: FPFormat, rounding: str = "nearest", generator=None,
             saturate: bool = True) -> torch.Tensor:
    """x rounded to fmt's grid, as float32 values (NaN stays NaN, -0 stays -0)."""
    check_rounding(rounding)
    x = x.float()
    ax = x.abs()
    if rounding == "stochastic" or saturate or fmt.nan_code is None and not fmt.has_inf:
        ax = ax.clamp(max=fmt.max)  # saturating (E2M1 always does); SR also rounds only inside the range
    finite = torch.isfinite(ax)
    ax_f = torch.where(finite, ax, 0.0)
    _, ex = torch.frexp(ax_f)  # ax = m * 2**ex, m in [0.5, 1)
    ulp_exp = (ex - 1).clamp(min=fmt.emin) - fmt.mbits
    y = torch.ldexp(ax_f, -ulp_exp)  # exact: a power-of-two scale
    if rounding == "nearest":
        y = torch.round(y)
    else:
        y = torch.floor(y + torch.rand(y.shape, generator=generator, device=y.device))
    q = torch.ldexp(y, ulp_exp)
    if fmt.has_inf or fmt.nan_code is not None:  # overflow (saturate=False), inf and NaN inputs
        big = float("inf") if fmt.has_inf else float("nan")
        q = torch.where((q > fmt.max) | torch.isinf(ax), big, q)
        q = torch.where(torch.isnan(ax), float("nan"), q)
    return torch.copysign(q, x)


def encode(x: torch.Tensor, fmt: FPFormat, rounding: str = "nearest", generator=None,
           saturate: bool = True) -> torch.Tensor:
    """Codes (uint8, fmt.bits low bits used) of x rounded to fmt."""
    q = fp_round(x, fmt, rounding, generator, saturate)
    sign = torch.signbit(q).to(torch.uint8) << (fmt.ebits + fmt.mbits)
    mag = q.abs()
    finite = torch.isfinite(mag)
    mag_f = torch.where(finite, mag, 0.0)
    _, ex = torch.frexp(mag_f)
    normal = mag_f >= 2.0 ** fmt.emin
    e_field = torch.where(normal, ex - 1 + fmt.bias, 0)
    m_field = torch.where(normal, torch.ldexp(mag_f, -(ex - 1)) - 1, torch.ldexp(mag_f, torch.tensor(-fmt.emin)))
    m_field = torch.ldexp(m_field, torch.tensor(fmt.mbits)).round()
    code = (e_field << fmt.mbits).to(torch.int32) + m_field.to(torch.int32)
    if fmt.has_inf:
        code = torch.where(torch.isinf(mag), ((1 << fmt.ebits) - 1) << fmt.mbits, code)
    if fmt.nan_code is not None:
        code = torch.where(torch.isnan(mag), fmt.nan_code, code)
    return code.to(torch.uint8) | sign


def decode(codes: torch.Tensor, fmt: FPFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return value_table(fmt, codes.device)[codes.long()].to(dtype)


def to_fp8(x: torch.Tensor, name: str = "e4m3", rounding: str = "nearest", generator=None,
           saturate: bool = True) -> torch.Tensor:
    """x encoded as torch's float8 dtype (the same bits torch's cast gives, and SR when asked)."""
    return encode(x, get_format(name), rounding, generator, saturate).view(TORCH_DTYPES[name])


# -- scaled FP8 (per tensor, per row, per 1x128 tile, per 128x128 block) ------------------------------

def pad_last(x: torch.Tensor, multiple: int, dims: int = 1) -> torch.Tensor:
    """Zero-pad the last `dims` dims up to multiples of `multiple`."""
    pad = []
    for size in reversed(x.shape[-dims:]):
        pad += [0, -size % multiple]
    return F.pad(x, pad) if any(pad) else x


def group_amax(x: torch.Tensor, scaling: str) -> torch.Tensor:
    """amax over each scaling group, broadcastable against x (padded to whole tiles/blocks for tile/block).

    tensor: over the last two dims (one scale per matrix; per expert for (E, N, K) weights);
    row: along the last dim; tile: 1 x 128 along the last dim; block: 128 x 128 in the last two dims."""
    a = x.abs()
    if scaling == "tensor":
        return a.amax(dim=(-2, -1), keepdim=True) if a.dim() >= 2 else a.amax(dim=-1, keepdim=True)
    if scaling == "row":
        return a.amax(dim=-1, keepdim=True)
    if scaling == "tile":
        t = a.reshape(*a.shape[:-1], a.shape[-1] // TILE, TILE).amax(dim=-1, keepdim=True)
        return t.expand(*t.shape[:-1], TILE).reshape(a.shape)
    if scaling == "block":
        M, K = a.shape[-2:]
        b = a.reshape(*a.shape[:-2], M // TILE, TILE, K // TILE, TILE).amax(dim=(-3, -1), keepdim=True)
        return b.expand(*b.shape[:-4], M // TILE, TILE, K // TILE, TILE).reshape(a.shape)
    raise ValueError(f"unknown FP8 scaling {scaling!r}; choose one of {SCALINGS}")


def fp8_scales(amax: torch.Tensor, fmt: FPFormat, pow2: bool = False) -> torch.Tensor:
    """Dequantisation scales s with x ~ s * q, q = round(x / s): s = amax / fmt.max (float scales), or the
    power of two 2**ceil(log2(amax / fmt.max)) (pow2: exact multiplies, a little range unused).
    An all-zero group gets scale 1."""
    s = amax.float() / fmt.max
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return torch.where(s > 0, s, torch.ones_like(s))


def fp8_fake_quant(x: torch.Tensor, name: str = "e4m3", scaling: str = "tile", rounding: str = "nearest",
                   generator=None, pow2: bool = False) -> torch.Tensor:
    """x scaled per group, rounded to FP8 and scaled back (float32): what an FP8 GEMM with these
    scales computes on. tile/block pad the last dim(s) with zeros to whole tiles, then crop."""
    fmt = get_format(name)
    shape = x.shape
    xp = pad_last(x.float(), TILE, 2 if scaling == "block" else 1) if scaling in ("tile", "block") else x.float()
    s = fp8_scales(group_amax(xp, scaling), fmt, pow2)
    q = fp_round(xp / s, fmt, rounding, generator) * s
    return q[tuple(slice(0, n) for n in shape)] if q.shape != shape else q
