"""FP8 GEMMs executed by torch's scaled matmul: the codes and scales the emulation computes go straight
into `torch._scaled_mm` (tensorwise, rowwise) or `torch.nn.functional.scaled_mm` (DeepSeek-V3 1x128 /
128x128 blocks) instead of being dequantised. On CUDA that is the FP8 tensor-core GEMM.

What torch's API takes (torch 2.11-2.13, aten Blas.cpp / CUDAScaledBlas.cpp):
- CPU and CUDA: E4M3/E5M2 codes, tensorwise (one float scale each) or rowwise ((M, 1) x (1, N)) scales;
  CUDA refuses E5M2 x E5M2 and rowwise before cuBLAS 12.9 only writes bf16/fp16.
- CUDA sm90 with cuBLASLt >= 12.9 only: 1x128 x 128x128, 128x128 x 1x128 and 1x128 x 1x128 block scales,
  column-major scale layouts (below). Not on CPU, not on sm100 (which takes MX 1x32 E8M0 scales,
  swizzled: not wired, mxfp8 / mxfp4-bwd stay emulated).
- A row-major (M, K), B column-major (K, N); CUDA needs K and N multiples of 16. Both are zero-padded
  here (zero codes add nothing) and the result cropped, on every device, so CPU runs what CUDA runs.

The codes are exactly the emulation's values: round-to-nearest is torch's own saturated cast (the
encoders are bit-exact with it: tests/test_lowp_formats.py), stochastic rounding is fp_round's, whose
values are on the FP8 grid so the cast is exact; the product differs from the emulation only by fp32
accumulation order. The result is accumulated in fp32 (no fast accumulation) and written in out_dtype (bf16/fp16
as asked, else fp32).

Legend: M rows of a, N rows of b, K the reduction dim, Kb/Nb in 128-blocks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .formats import TILE, TORCH_DTYPES, fp8_scales, fp_round, get_format, group_amax, pad_last

ALIGN = 16  # CUDA's _scaled_mm: K and N multiples of 16
PAIRS = {("tensor", "tensor"), ("row", "row")}  # scale pairs torch runs on CPU and CUDA
BLOCK_PAIRS = {("tile", "block"), ("tile", "tile")}  # CUDA sm90 only


def fp8_quantize(x: torch.Tensor, elem: str, scaling: str, rounding: str = "nearest",
                 generator=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) with x ~ codes * scales: the numbers of formats.fp8_fake_quant (same padding to
    whole tiles/blocks, same scales), codes in torch's float8 dtype, row-major; scales compact: tensor
    (1, 1), row (M, 1), tile (M, Kb), block (Mb, Kb)."""
    fmt = get_format(elem)
    tiled = scaling in ("tile", "block")
    xp = pad_last(x.float(), TILE, 2 if scaling == "block" else 1) if tiled else x.float()
    s = fp8_scales(group_amax(xp, scaling), fmt)
    y = xp / s
    if rounding == "nearest":  # torch's saturated cast rounds to nearest even: fp_round's grid, bit for bit
        codes = y.clamp(-fmt.max, fmt.max).to(TORCH_DTYPES[elem]).contiguous()
    else:
        codes = fp_round(y, fmt, rounding, generator).to(TORCH_DTYPES[elem]).contiguous()
    if scaling == "tile":
        s = s[:, ::TILE]
    elif scaling == "block":
        s = s[::TILE, ::TILE]
    return codes, s.reshape(1, 1) if scaling == "tensor" else s.contiguous()


def unsupported(a, b, rht: bool, device: torch.device) -> Optional[str]:
    """Why torch cannot run this GEMM (operands: recipes.Operand) as a scaled matmul here; None if it can."""
    if a.kind != "fp8" or b.kind != "fp8":
        return f"operands {a.kind} x {b.kind}: only FP8 x FP8 goes to torch._scaled_mm (MX scales not wired)"
    if rht:
        return "the Hadamard transform is emulated"
    if a.elem == b.elem == "e5m2":
        return "torch._scaled_mm takes no E5M2 x E5M2"
    pair = (a.scaling, b.scaling)
    if pair in PAIRS:
        return None
    if pair not in BLOCK_PAIRS:
        return f"torch has no {a.scaling} x {b.scaling} scaled matmul"
    if device.type != "cuda":
        return f"torch's {device.type} _scaled_mm takes tensorwise and rowwise scales only, not 1x128/128x128 blocks"
    if not hasattr(F, "scaled_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (block scales)"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "torch runs 1x128/128x128 block scales on sm90 (Hopper) only"
    return None


def pad_rows(t: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    """t with `rows` more rows of `value` (float8 padded through its bytes: code 0 is +0)."""
    if rows == 0:
        return t
    if t.dtype in TORCH_DTYPES.values():
        return F.pad(t.view(torch.uint8), (0, 0, 0, rows)).view(t.dtype)
    return F.pad(t, (0, 0, 0, rows), value=value)


def pad_cols(t: torch.Tensor, cols: int, value: float = 0.0) -> torch.Tensor:
    if cols == 0:
        return t
    if t.dtype in TORCH_DTYPES.values():
        return F.pad(t.view(torch.uint8), (0, cols)).view(t.dtype)
    return F.pad(t, (0, cols), value=value)


def column_major(s: torch.Tensor) -> torch.Tensor:
    """The same values with strides (1, rows): the layout torch's block scales are read in."""
    return s.t().contiguous().t()


def fp8_scaled_mm(qa: Tuple[torch.Tensor, torch.Tensor], qb: Tuple[torch.Tensor, torch.Tensor],
                  scalings: Tuple[str, str], n_out: int, out_dtype: torch.dtype) -> torch.Tensor:
    """(a_codes * a_scales) @ (b_codes * b_scales)ᵀ, first n_out columns, in out_dtype; qa, qb from
    fp8_quantize along the same reduction dim."""
    (a_MK, sa), (b_NK, sb) = qa, qb
    kernel_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float16) else torch.float32
    k_pad, n_pad = -a_MK.shape[1] % ALIGN, -b_NK.shape[0] % ALIGN  # block scalings: already whole tiles
    a_MK, b_NK = pad_cols(a_MK, k_pad), pad_rows(pad_cols(b_NK, k_pad), n_pad)
    if scalings in PAIRS:
        if scalings[1] == "row":
            sb = pad_rows(sb, n_pad, 1.0).reshape(1, -1)
        out = torch._scaled_mm(a_MK, b_NK.t(), scale_a=sa, scale_b=sb, out_dtype=kernel_dtype)
    else:
        sa = column_major(sa)  # (M, Kb), strides (1, M)
        if scalings[1] == "block":  # (round_up(Kb, 4), Nb), strides (1, round_up(Kb, 4))
            sb = pad_cols(sb, -sb.shape[1] % 4, 1.0).contiguous().t()
            recipe_b = F.ScalingType.BlockWise128x128
        else:  # (N, Kb), strides (1, N)
            sb = column_major(pad_rows(sb, n_pad, 1.0))
            recipe_b = F.ScalingType.BlockWise1x128
        out = F.scaled_mm(a_MK, b_NK.t(), sa, F.ScalingType.BlockWise1x128, sb, recipe_b,
                          output_dtype=kernel_dtype)
    return out[:, :n_out].to(out_dtype)
