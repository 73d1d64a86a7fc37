"""`analyze()`: every number of the analyzer for one model + hardware, and its text report."""

from __future__ import annotations

from typing import Dict, Optional

from . import estimate, formulas
from .arch import Arch, from_model_config
from .catalog import SONICMOE_H100
from .hardware import Hardware, get_hardware
from .params import params_by_component
from .precision import dtype_bytes, get_precision


def analyze(arch: Arch, hardware="h100", weights: Optional[str] = None, kv_dtype: Optional[str] = None,
            batch: int = 1, context: int = 4096, tokens: int = 4096) -> Dict:
    """All analyzer outputs as a dict (the `--json` document); see the module docs for formulas."""
    for name, value in (("--batch", batch), ("--context", context), ("--tokens", tokens)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    hw: Hardware = get_hardware(hardware)
    weights = weights or {"float32": "fp32", "float16": "fp16", "float64": "fp32"}.get(arch.dtype, "bf16")
    prec = get_precision(weights)
    kv_dtype = kv_dtype or (weights if weights in ("fp32", "bf16", "fp16") else "bf16")
    kv_nbytes = dtype_bytes(kv_dtype)
    act_bytes = 4 if weights == "fp32" else 2
    peak = hw.peak_flops(fp32=weights == "fp32")
    ctx = context if arch.attention is not None else 0

    by_comp = params_by_component(arch)
    by_comp_active = params_by_component(arch, active=True)
    wbytes = estimate.weight_bytes_by_component(arch, prec)
    flops_comp = estimate.flops_by_component(arch, ctx)
    fwd = sum(flops_comp.values())
    moe = arch.moe
    bytes_per_weight = prec.bits_per_weight(arch.d_model) / 8
    dec = estimate.decode(arch, prec, peak, hw.bw, batch, ctx, kv_nbytes)
    dec1 = estimate.decode(arch, prec, peak, hw.bw, 1, ctx, kv_nbytes)
    # a bare layer has no context: its "prefill" is one forward over --tokens tokens
    pre = (estimate.prefill(arch, prec, peak, hw.bw, batch, ctx, kv_nbytes) if ctx
           else estimate.prefill(arch, prec, peak, hw.bw, tokens, 1, kv_nbytes))
    out = {
        "model": arch.name,
        "hardware": {"name": hw.name, "flops": hw.flops, "flops_used": peak, "bw": hw.bw, "note": hw.note},
        "inputs": {"weights": weights, "kv_dtype": kv_dtype, "batch": batch, "context": ctx, "tokens": tokens},
        "n_layers": arch.n_layers,
        "n_moe_layers": len(arch.moe_ffns),
        "params_total": sum(by_comp.values()),
        "params_active": sum(by_comp_active.values()),
        "params_by_component": by_comp,
        "params_active_by_component": by_comp_active,
        "granularity": formulas.granularity(arch.d_model, moe.d_expert) if moe else None,
        "sparsity": formulas.sparsity(moe.top_k, moe.num_experts) if moe else None,
        "flops_per_token_forward": fwd,
        "flops_per_token_forward_by_component": flops_comp,
        "flops_per_token_training": 3 * fwd,
        "kv_bytes_per_token": estimate.kv_bytes_per_token(arch, kv_nbytes),
        "weight_bytes": sum(wbytes.values()),
        "weight_bytes_by_component": wbytes,
        "bytes_per_weight": bytes_per_weight,
        "moe_arithmetic_intensity": (formulas.moe_arithmetic_intensity(tokens, arch.d_model, moe.d_expert, moe.top_k,
                                                                       moe.num_experts, act_bytes, bytes_per_weight)
                                     if moe else None),
        "critical_batch": formulas.critical_batch(peak, bytes_per_weight, hw.bw),
        "break_even_batch": estimate.break_even_batch(arch, prec, peak, hw.bw, ctx, kv_nbytes),
        "decode_tokens_per_s": dec["tokens_per_s"],
        "decode_bound": dec["bound"],
        "decode_bytes_per_step": dec["bytes"],
        "decode_tokens_per_s_batch1": dec1["tokens_per_s"],
        "experts_touched_per_layer": formulas.experts_touched(moe.num_experts, moe.top_k, batch) if moe else None,
        "prefill_tokens_per_s": pre["tokens_per_s"],
        "prefill_bound": pre["bound"],
        "activation_bytes_per_moe_layer": (estimate.activation_bytes_per_moe_layer(
            arch.d_model, moe.d_expert, moe.num_experts, moe.top_k, tokens, act_bytes) if moe else None),
        "published": None,
        "formulas": formulas.FORMULAS,
        "notes": list(arch.notes),
    }
    if moe:
        key = (tokens, arch.d_model, moe.d_expert, moe.num_experts, moe.top_k)
        if key in SONICMOE_H100:
            out["published"] = {k: dict(zip(("fwd_tflops", "bwd_tflops", "peak_activation_gib"), v))
                                for k, v in SONICMOE_H100[key].items()}
    return out


def analyze_model(model_cfg, hardware="local", weights: Optional[str] = None, batch: int = 1, context: int = 512,
                  **kwargs) -> Dict:
    """`analyze()` for a moekit ModelConfig (e.g. `model.cfg`)."""
    return analyze(from_model_config(model_cfg), hardware=hardware, weights=weights, batch=batch, context=context, **kwargs)


# ----------------------------------------------------------------------------- text
def _n(x: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= unit:
            return f"{x / unit:.2f}{s}"
    return f"{x:.0f}"


def _b(x: float) -> str:
    for unit, s in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(x) >= unit:
            return f"{x / unit:.2f} {s}"
    return f"{x:.0f} B"


def _f(x: float) -> str:
    for unit, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(x) >= unit:
            return f"{x / unit:.2f} {s}FLOP"
    return f"{x:.0f} FLOP"


def render(r: Dict) -> str:
    inp, hw = r["inputs"], r["hardware"]
    lines = [f"# {r['model']}  on {hw['name']} ({_f(hw['flops_used'])}/s, {hw['bw'] / 1e9:.0f} GB/s{'; ' + hw['note'] if hw['note'] else ''})",
             f"weights {inp['weights']}, KV {inp['kv_dtype']}, batch {inp['batch']}, context {inp['context']}, "
             f"MoE tokens {inp['tokens']}", ""]
    lines += ["| component | params | active | weight bytes | fwd FLOPs/token |", "|---|---:|---:|---:|---:|"]
    for c, n in r["params_by_component"].items():
        if n or r["flops_per_token_forward_by_component"][c]:
            lines.append(f"| {c} | {_n(n)} | {_n(r['params_active_by_component'][c])} | {_b(r['weight_bytes_by_component'][c])} "
                         f"| {_f(r['flops_per_token_forward_by_component'][c])} |")
    lines.append(f"| **total** | **{_n(r['params_total'])}** | **{_n(r['params_active'])}** | **{_b(r['weight_bytes'])}** "
                 f"| **{_f(r['flops_per_token_forward'])}** |")
    lines += ["", "| quantity | value | formula |", "|---|---:|---|"]
    F = r["formulas"]
    rows = []
    if r["granularity"] is not None:
        rows += [("granularity G", f"{r['granularity']:.4g}", F["granularity"]),
                 ("sparsity rho", f"{r['sparsity']:.4g}", F["sparsity"]),
                 (f"MoE arithmetic intensity (T={inp['tokens']})", f"{r['moe_arithmetic_intensity']:.1f} FLOP/B",
                  F["moe_arithmetic_intensity"]),
                 (f"experts touched per layer (B={inp['batch']})", f"{r['experts_touched_per_layer']:.1f}", F["experts_touched"])]
    rows += [("forward FLOPs / token", _f(r["flops_per_token_forward"]), F["forward_flops"]),
             ("training FLOPs / token", _f(r["flops_per_token_training"]), F["training_flops"]),
             ("KV cache / token", _b(r["kv_bytes_per_token"]), F["kv_bytes"]),
             ("critical batch B*", f"{r['critical_batch']:.0f}", F["critical_batch"]),
             ("break-even batch (this model)", f"{r['break_even_batch']}" if r["break_even_batch"] else "never (memory-bound)",
              "smallest B with compute time >= memory time, experts touched + KV included"),
             (f"decode tok/s (B={inp['batch']})", f"{r['decode_tokens_per_s']:.1f} ({r['decode_bound']}-bound)", F["decode_time"]),
             ("decode tok/s (B=1)", f"{r['decode_tokens_per_s_batch1']:.1f}", F["decode_bound_batch1"])
             if inp["batch"] != 1 else None,
             (f"prefill tok/s (B={inp['batch']})", f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_bound']}-bound)",
              "prefill: all weights once, FLOPs at mean context (C+1)/2")]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in filter(None, rows)]
    act = r["activation_bytes_per_moe_layer"]
    if act:
        lines += ["", f"Activation bytes kept for backward per MoE layer (T={inp['tokens']}):", "",
                  "| policy | bytes | keeps |", "|---|---:|---|",
                  f"| naive | {_b(act['naive'])} | X, gathered X, H, A, Y |",
                  f"| scattermoe | {_b(act['scattermoe'])} | X, H, A, Y |",
                  f"| moekit | {_b(act['moekit'])} | X, H (grouped backend) |"]
    if r["published"]:
        lines += ["", "Published H100 figures at this shape (docs/formulas.md; fwd/bwd TFLOPS, peak activation GiB):"]
        for k, v in r["published"].items():
            lines.append(f"- {k}: {v['fwd_tflops']}/{v['bwd_tflops']}, {v['peak_activation_gib']} GiB")
    for note in r["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
