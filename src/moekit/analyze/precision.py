"""Weight precisions with their real storage cost, scales included: fp32/bf16/fp16, fp8 (one fp32
scale per 128x128 block, docs/formulas.md#number-formats), and the `moekit.quantize` formats, whose
bytes come from the format class itself (int4 = int4-g128; mxfp4 = 4.25 bits, gpt-oss's experts). Only weight matrices are quantized;
biases, norm weights and the router stay 16-bit (32-bit with fp32 weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict


class Precision:
    """How weight matrices are stored: their bytes, and the bytes of the float vectors beside them."""

    name: str
    note: str
    float_bytes: int  # bytes of an unquantized vector element (bias, norm weight) stored beside these weights

    def matrix_bytes(self, rows: int, cols: int) -> float:
        raise NotImplementedError

    def bits_per_weight(self, cols: int = 4096) -> float:
        """Average bits per weight for a matrix with `cols` input features."""
        return self.matrix_bytes(128, cols) * 8 / (128 * cols)


@dataclass(frozen=True)
class FloatPrecision(Precision):
    """Plain floats, or with one scale per block x block tile (fp8 as DeepSeek-V3 stores it)."""

    name: str
    bits: int
    block: int = 0  # 0: no scales
    scale_bits: int = 32
    float_bytes: int = 2
    note: str = ""

    def matrix_bytes(self, rows: int, cols: int) -> float:
        if not self.block:
            return rows * cols * self.bits / 8
        n_scales = math.ceil(rows / self.block) * math.ceil(cols / self.block)
        return rows * cols * self.bits / 8 + n_scales * self.scale_bits / 8


@dataclass(frozen=True)
class WeightOnly(Precision):
    """A `moekit.quantize` format: bytes and bits per weight come from the format class."""

    name: str
    fmt: Any  # a moekit.quantize.formats.Format
    float_bytes: int = 2
    alias_note: str = ""

    @property
    def note(self) -> str:
        return self.alias_note or self.fmt.layout

    def matrix_bytes(self, rows: int, cols: int) -> float:
        # the format zero-pads each row to a whole number of groups, as moekit.quantize stores it
        return float(rows * self.fmt.row_nbytes(cols))

    def bits_per_weight(self, cols: int = 4096) -> float:
        return self.fmt.bits_per_weight(cols)


FLOAT_PRECISIONS = {p.name: p for p in (
    FloatPrecision("fp32", 32, float_bytes=4),
    FloatPrecision("bf16", 16),
    FloatPrecision("fp16", 16),
    FloatPrecision("fp8", 8, block=128, note="E4M3, fp32 scale per 128x128 block"),
)}
# for --help without importing moekit.quantize (and torch): the full list is `precisions()`
NAMES_HELP = "fp32, bf16, fp16, fp8, int8, int4 (= int4-g128), int4-g32, int4-g64, int4-g128, q8_0, q4_0, mxfp4"

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1, "float64": 8}


def precisions() -> Dict[str, Precision]:
    """Every precision: fp32, bf16, fp16, fp8, int8, int4 (the alias), then moekit.quantize's formats in its
    order. Imports moekit.quantize (and torch), so the float ones resolve without calling this."""
    from ..quantize.formats import FORMATS, get_format

    weight_only = {name: WeightOnly(name, fmt) for name, fmt in FORMATS.items()}
    return {**FLOAT_PRECISIONS, "int8": weight_only["int8"],
            "int4": WeightOnly("int4", get_format("int4-g128"), alias_note="= int4-g128"), **weight_only}


def get_precision(name: str) -> Precision:
    if name in FLOAT_PRECISIONS:
        return FLOAT_PRECISIONS[name]
    known = precisions()
    if name not in known:
        raise ValueError(f"unknown --weights precision {name!r}; choose one of {', '.join(known)}")
    return known[name]


def dtype_bytes(name: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown --kv-dtype {name!r}; choose one of fp32, bf16, fp16, fp8, int8")
    return DTYPE_BYTES[name]
