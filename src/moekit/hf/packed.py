"""Quantized HF checkpoints, as config.json's `quantization_config` names them:

    mxfp4 (gpt-oss)   `<name>_blocks` uint8 (E, cols, rows / 32, 16): two E2M1 codes a byte, and `<name>_scales`
                      uint8 (E, cols, rows / 32) E8M0, for the spec's `mxfp4_matrices` (HF's (E, rows, cols)
                      matrix transposed). Kept packed (quantize.modules.QuantizedWeight, weight-only) or
                      dequantized (load_hf(dequantize=True); training needs float weights).
    fp8 (DeepSeek-V3, Kimi K2)  `<name>.weight` float8_e4m3fn with `<name>.weight_scale_inv` float32 per
                      weight_block_size block (128 x 128; edge blocks partial): w = fp8 * scale_inv,
                      dequantized on load.

`QuantizedParts` turns the pieces into what the rest of load_hf reads: a float HF tensor, or a packed
weight. Legend: E experts, b0 x b1 the FP8 block.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

METHODS = ("mxfp4", "fp8")
FP8_SCALE = "_scale_inv"  # "<name>.weight" + this
MX_PARTS = ("_blocks", "_scales")


def quant_method(hf: dict) -> Optional[str]:
    """config.json's quantization method (None: plain weights); ValueError for one moekit cannot read."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"quantization_config quant_method={method!r} is not supported; moekit reads "
                         f"{' and '.join(METHODS)} checkpoints (or unquantized ones)")
    if method == "fp8":
        block = quant.get("weight_block_size")
        ok = isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        if not ok:
            raise ValueError(f"quantization_config (fp8) weight_block_size={block!r}: moekit reads block-wise FP8 "
                             "with two positive block sizes, e.g. [128, 128]")
    return method


def dequantize_fp8(w_NK: torch.Tensor, scale_inv_nk: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """float32 w * scale_inv, each scale covering a b0 x b1 block (the last row/column of blocks partial)."""
    N, K = w_NK.shape
    b0, b1 = block
    scale_NK = scale_inv_nk.float().repeat_interleave(b0, 0)[:N].repeat_interleave(b1, 1)[:, :K]
    return w_NK.float() * scale_NK


def fp8_scale_shape(shape, block: Tuple[int, int]) -> Tuple[int, ...]:
    return tuple(math.ceil(n / b) for n, b in zip(shape[-2:], block))


class QuantizedParts:
    """Collects the pieces of quantized tensors until each is whole.

    `expected_shape(key, base_shape)` -> the shape of a part, or None when `key` is no part;
    `add(key, tensor)` -> None (waiting for the other part) or (base HF key, float tensor or
    ("mxfp4", blocks, scales))."""

    def __init__(self, method: Optional[str], hf: dict, mxfp4_matrices=(), dequantize: bool = False):
        self.method, self.dequantize = method, dequantize
        self.block = tuple((hf.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
        self.mxfp4_matrices = tuple(mxfp4_matrices)
        self.pending: Dict[str, Dict[str, torch.Tensor]] = {}

    def split(self, key: str) -> Optional[Tuple[str, str]]:
        """(base key, part) when `key` is a part of a quantized tensor."""
        if self.method == "mxfp4":
            for part in MX_PARTS:
                if key.endswith(part) and key[: -len(part)].endswith(self.mxfp4_matrices):
                    return key[: -len(part)], part
        if self.method == "fp8" and key.endswith(".weight" + FP8_SCALE):
            return key[: -len(FP8_SCALE)], FP8_SCALE
        return None

    def expected_shape(self, key: str, base_shape) -> Optional[Tuple[int, ...]]:
        if base_shape is None:
            return None
        *lead, rows, cols = base_shape
        _, part = self.split(key)
        if part == FP8_SCALE:
            return fp8_scale_shape(base_shape, self.block)
        return (*lead, cols, rows // 32, 16) if part == "_blocks" else (*lead, cols, rows // 32)

    def waits_for(self, key: str, tensor: torch.Tensor) -> bool:
        """Whether `key` (a table key) is an FP8 weight that needs its scale first."""
        return self.method == "fp8" and tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def add(self, key: str, tensor: torch.Tensor, part: str):
        parts = self.pending.setdefault(key, {})
        parts[part] = tensor
        if self.method == "fp8" and {"", FP8_SCALE} <= parts.keys():
            del self.pending[key]
            return dequantize_fp8(parts[""], parts[FP8_SCALE], self.block)
        if self.method == "mxfp4" and set(MX_PARTS) <= parts.keys():
            del self.pending[key]
            blocks, scales = parts["_blocks"], parts["_scales"]
            if self.dequantize:
                from ..quantize.modules import QuantizedWeight

                return QuantizedWeight.from_mxfp4_blocks(blocks, scales, torch.float32).dense().transpose(-1, -2)
            return ("mxfp4", blocks, scales)
        return None

    def incomplete(self) -> Dict[str, Tuple[str, ...]]:
        """Base keys still missing a part -> the parts read."""
        return {key: tuple(parts) for key, parts in self.pending.items()}
