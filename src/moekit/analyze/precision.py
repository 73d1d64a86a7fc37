"""Weight precisions with their real storage cost, scales included.

bytes(matrix of R rows x C input features) = R*C*bits/8 + (number of scales) * scale_bytes:

| name | layout | bits per weight |
|---|---|---|
| fp32 / bf16 / fp16 | plain | 32 / 16 / 16 |
| fp8  | E4M3, one fp32 scale per 128x128 block (DeepSeek-V3) | 8 + 32/16384 = 8.002 |
| int8 | symmetric, one fp32 scale per output channel (row) | 8 + 32/C |
| int4-gN | asymmetric, fp16 scale + fp16 offset per group of N (32/64/128) along the input | 4 + 32/N |
| int4 | = int4-g128 | 4.25 |
| q8_0 | blocks of 32 int8 + one fp16 scale (34 bytes) | 8.5 |
| q4_0 | blocks of 32 4-bit + one fp16 scale (18 bytes) | 4.5 |

These are the layouts `moekit.quantize` stores (q8_0/q4_0 are llama.cpp's, bit-exact).
Only weight matrices are quantized; biases, norm weights and (for the analyzer) the
router stay in 16-bit (32-bit when the weights are fp32). Activations and the KV cache
have their own dtype (`--kv-dtype`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Precision:
    name: str
    bits: float  # bits per stored element
    group: Optional[int] = None  # elements per scale along the input; None: per row (int8) or no scale
    scale_bits: int = 0
    block_2d: Optional[int] = None  # fp8: one scale per block_2d x block_2d tile
    per_row: bool = False
    note: str = ""

    def matrix_bytes(self, rows: int, cols: int) -> float:
        # group-wise formats zero-pad each row to a whole number of groups (as moekit.quantize stores them)
        stored_cols = math.ceil(cols / self.group) * self.group if self.group else cols
        data = rows * stored_cols * self.bits / 8
        if self.block_2d:
            n_scales = math.ceil(rows / self.block_2d) * math.ceil(cols / self.block_2d)
        elif self.per_row:
            n_scales = rows
        elif self.group:
            n_scales = rows * math.ceil(cols / self.group)
        else:
            n_scales = 0
        return data + n_scales * self.scale_bits / 8

    def bits_per_weight(self, cols: int = 4096) -> float:
        """Average bits per weight for a matrix with `cols` input features."""
        return self.matrix_bytes(128, cols) * 8 / (128 * cols)

    @property
    def float_bytes(self) -> int:
        """Bytes of an unquantized vector (bias, norm weight) stored beside these weights."""
        return 4 if self.name == "fp32" else 2


PRECISIONS = {
    "fp32": Precision("fp32", 32),
    "bf16": Precision("bf16", 16),
    "fp16": Precision("fp16", 16),
    "fp8": Precision("fp8", 8, scale_bits=32, block_2d=128, note="E4M3, fp32 scale per 128x128 block"),
    "int8": Precision("int8", 8, scale_bits=32, per_row=True, note="per-channel fp32 scale"),
    "int4": Precision("int4", 4, group=128, scale_bits=32, note="= int4-g128"),
    "int4-g32": Precision("int4-g32", 4, group=32, scale_bits=32, note="fp16 scale + fp16 offset per 32"),
    "int4-g64": Precision("int4-g64", 4, group=64, scale_bits=32, note="fp16 scale + fp16 offset per 64"),
    "int4-g128": Precision("int4-g128", 4, group=128, scale_bits=32, note="fp16 scale + fp16 offset per 128"),
    "q8_0": Precision("q8_0", 8, group=32, scale_bits=16, note="32 int8 + fp16 scale = 34 bytes"),
    "q4_0": Precision("q4_0", 4, group=32, scale_bits=16, note="32 4-bit + fp16 scale = 18 bytes"),
}

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp8": 1, "int8": 1, "float64": 8}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown --weights precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def dtype_bytes(name: str, what: str = "--kv-dtype") -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown {what} {name!r}; choose one of fp32, bf16, fp16, fp8, int8")
    return DTYPE_BYTES[name]
