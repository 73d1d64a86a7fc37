"""8-bit activations for q8_0 / q4_0 weights: llama.cpp's scheme, opt-in.

By default a quantized weight multiplies float activations (x @ dequantize(W)ᵀ). With
`moekit.quantize.set_activations(model, "q8_0")` (transform.py; `--activations q8_0` in the CLI),
every row of x is first quantized per 32-block like a q8_0 weight,

    d_x = max|x_block| / 127,   q_x = round-half-even(x * (1 / d_x))      (d_x float32; GGML stores fp16)

and each block's dot product runs in exact integers, scaled by d_w * d_x. This is what llama.cpp does
for these formats on CPU; the C kernel (`moekit_x8_matvec` in moekit/cpu_matvec.c, the op
`torch.ops.moekit.x8matvec`) runs it over a copy of the weight repacked into panels of 16 output rows
(`QuantizedWeight.x8_panels`), one AVX-512 VNNI instruction multiplying 4 codes of 16 rows by 4 bytes
of x, which is what makes q4_0 cheaper than q8_0 to compute, not only to store. It changes the numbers (a relative error of ~1% per dot product,
as llama.cpp's), so it is a runtime choice, never saved in a checkpoint, and only for inference.

Every matmul of such a weight goes row by row through `QuantizedWeight.linear` / `.gathered_matvec`
(the routed experts take the per-pair path for any number of tokens: `rowwise_only`), so prefill,
decode, generate, the engine, eager and compiled all compute the same thing, and a row's result never
depends on the other rows (batch invariant). Where the kernel cannot run (no C compiler, not x86
Linux, bf16 x), `fake_quantize_x8` and a float matmul compute the same math in torch.

Legend: R rows, K reduction dim, B blocks of 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("float", "q8_0")  # what `set_activations` takes
WEIGHT_METHODS = ("q8_0", "q4_0")  # the weight formats 8-bit activations apply to


def check_kind(kind: str) -> None:
    """ValueError naming `kind` unless it is one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"activations must be one of {', '.join(KINDS)}; got {kind!r}")


def quantize_x8(x_RK: torch.Tensor):
    """(q (R, B, 32) int8, d (R, B) float32): x (R, K) per 32-block, K padded with zeros to whole blocks
    (the same numbers the C kernel computes, bit for bit)."""
    R, K = x_RK.shape
    x_RB32 = F.pad(x_RK.float(), (0, -K % 32)).view(R, -1, 32)
    d_RB = x_RB32.abs().amax(-1) / 127.0
    inv_RB = torch.where(d_RB != 0, 1.0 / d_RB, torch.zeros_like(d_RB))
    return torch.round(x_RB32 * inv_RB[..., None]).to(torch.int8), d_RB


def fake_quantize_x8(x_RK: torch.Tensor) -> torch.Tensor:
    """x (R, K) rounded through 8-bit blocks: q * d, in x's dtype (the torch path of 8-bit activations)."""
    q_RB32, d_RB = quantize_x8(x_RK)
    return (q_RB32.float() * d_RB[..., None]).flatten(1)[:, :x_RK.shape[1]].to(x_RK.dtype)
