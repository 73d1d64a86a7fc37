"""Low-precision training recipes on catalog hardware (moekit.lowp.recipes): per recipe the bits per value
of the GEMM operands (the forward's weights and activations, the dgrad's output gradients; scales
included), the bytes of the weights' forward GEMM copy, and the training GEMM throughput the chip's peaks allow.

Model: a training step runs three GEMMs per weight, 2·N FLOPs each per token (forward, dgrad, wgrad; N the
active parameters). A GEMM whose operands are both FP8 or MXFP8 runs at the FP8 peak, both MXFP4 at the FP4
peak (chips without FP4 units run it at the FP8 peak), else at the 16-bit peak. Parts the recipe keeps in
high precision (the head by default; router, norms and embeddings always) run at the 16-bit peak.
Peaks: hardware.py (sources there). Bytes are what a real kernel stores; the CPU emulation keeps the compute
dtype (docs/low_precision.md).
"""

from __future__ import annotations

from typing import Dict, List

from ..lowp.recipes import PRECISIONS, get_recipe
from ..shape import Arch
from .hardware import get_hardware
from .params import params_by_component

PART_COMPONENTS = {"attention": ("attention",), "ffn": ("dense_ffn", "shared_experts"), "experts": ("experts",),
                   "head": ("head",)}
HIGH = 16.0  # bits of a high-precision (bf16) operand on the GPU


def gemm_peak(gemm, hw):
    kinds = {(op.kind, op.elem) for op in (gemm.a, gemm.b)}
    if any(kind == "none" for kind, _ in kinds):
        return hw.flops, "bf16"
    if all(elem == "e2m1" for _, elem in kinds):
        if hw.flops_fp4:
            return hw.flops_fp4, "fp4"
        return (hw.flops_fp8, "fp4 as fp8") if hw.flops_fp8 else (hw.flops, "fp4 as bf16")
    return (hw.flops_fp8, "fp8") if hw.flops_fp8 else (hw.flops, "fp8 as bf16")


def operand_bits(op) -> float:
    return HIGH if op.kind == "none" else op.bits()


def lowp_rows(arch: Arch, hardware="h100") -> List[Dict]:
    """One row per precision: bits of the weight / gradient / activation operands, the weight GEMM copy's
    bytes, the step's GEMM time per token and its throughput relative to bf16."""
    hw = get_hardware(hardware)
    total = params_by_component(arch)
    active = params_by_component(arch, active=True)
    rows = []
    for name in PRECISIONS:
        recipe = get_recipe(name)
        parts = [] if recipe is None else [p for p in PART_COMPONENTS if p not in recipe.keep]
        quantised = [c for p in parts for c in PART_COMPONENTS[p]]
        n_q, n_active = sum(active[c] for c in quantised), sum(active.values())
        seconds, peaks = 0.0, {}
        for role in ("fwd", "dgrad", "wgrad"):
            peak, label = (hw.flops, "bf16") if recipe is None else gemm_peak(recipe.gemm(role), hw)
            seconds += 2 * n_q / peak + 2 * (n_active - n_q) / hw.flops
            peaks[role] = label
        w_bits = HIGH if recipe is None else operand_bits(recipe.fwd.b)  # the forward's copy (mxfp4-bwd: bf16)
        rows.append({
            "precision": name, "gemms": peaks,
            "weight_bits": w_bits, "grad_bits": HIGH if recipe is None else operand_bits(recipe.dgrad.a),
            "act_bits": HIGH if recipe is None else operand_bits(recipe.fwd.a),
            "weight_copy_bytes": (sum(total[c] for c in quantised) * w_bits
                                  + sum(total[c] for c in total if c not in quantised) * HIGH) / 8,
            "step_flops_per_s": 6 * n_active / seconds,
        })
    base = rows[0]["step_flops_per_s"]
    for row in rows:
        row["speedup"] = row["step_flops_per_s"] / base
    return rows


def render_lowp(rows: List[Dict], hardware: str) -> str:
    lines = [f"low-precision training on {hardware} (GEMM peaks only; weight copy = the GEMM operand, masters apart)",
             f"{'precision':16s} {'fwd/dgrad/wgrad':30s} {'w bits':>6s} {'dy bits':>7s} {'x bits':>6s} "
             f"{'weights':>10s} {'PFLOP/s':>8s} {'vs bf16':>7s}"]
    for r in rows:
        g = r["gemms"]
        lines.append(f"{r['precision']:16s} {g['fwd'] + '/' + g['dgrad'] + '/' + g['wgrad']:30s} "
                     f"{r['weight_bits']:6.2f} {r['grad_bits']:7.2f} {r['act_bits']:6.2f} "
                     f"{r['weight_copy_bytes'] / 1e9:8.2f}GB {r['step_flops_per_s'] / 1e15:8.2f} {r['speedup']:6.2f}x")
    return "\n".join(lines)
