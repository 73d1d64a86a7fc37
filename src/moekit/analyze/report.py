"""`analyze()`: every number of the analyzer for one model + hardware, and its text report."""

from __future__ import annotations

from typing import Dict, List, Optional

from dataclasses import replace

from . import comm, estimate, formulas
from .arch import Arch, from_model_config
from .catalog import SONICMOE_H100
from .hardware import GIB, Hardware, get_hardware
from .memory import memory
from .params import params_by_component
from .precision import dtype_bytes, get_precision


def analyze(arch: Arch, hardware="h100", weights: Optional[str] = None, kv_dtype: Optional[str] = None,
            batch: int = 1, context: int = 4096, tokens: int = 4096, memory_gib: Optional[float] = None,
            dp: Optional[int] = None, ep: Optional[int] = None, nodes: Optional[int] = None) -> Dict:
    """All analyzer outputs as a dict (the `--json` document); see the module docs for formulas.
    memory_gib overrides the hardware's device memory. dp, ep, nodes (any of them) add the `communication`
    section (analyze/comm.py) for training on dp GPUs (default: ep, or nodes full nodes) with EP degree ep
    (default 1) over `nodes` nodes (default: as few as hold dp GPUs)."""
    for name, value in (("--batch", batch), ("--context", context), ("--tokens", tokens)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    hw: Hardware = get_hardware(hardware)
    if memory_gib is not None:
        if not 0 < memory_gib < float("inf"):
            raise ValueError(f"--memory must be a positive number of GiB, got {memory_gib!r}")
        hw = replace(hw, memory=memory_gib * GIB)
    weights = weights or {"float32": "fp32", "float16": "fp16", "float64": "fp32"}.get(arch.dtype, "bf16")
    prec = get_precision(weights)
    kv_dtype = kv_dtype or (weights if weights in ("fp32", "bf16", "fp16") else "bf16")
    kv_nbytes = dtype_bytes(kv_dtype)
    act_bytes = 4 if weights == "fp32" else 2
    peak, peak_name = hw.peak(weights)
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
    state = estimate.state_bytes_per_sequence(arch, kv_nbytes) if ctx else 0.0
    mem = memory(arch, sum(by_comp.values()), sum(wbytes.values()), estimate.kv_bytes_per_token(arch, kv_nbytes, ctx),
                 batch, ctx, tokens, hw.memory, "fp32" if weights == "fp32" else "bf16", state)
    communication = None
    if dp is not None or ep is not None or nodes is not None:
        ep = 1 if ep is None else ep
        if dp is None:
            dp = nodes * hw.gpus_per_node if isinstance(nodes, int) and nodes > 0 and hw.gpus_per_node else ep
        train_bytes = 4 if weights == "fp32" else 2
        communication = comm.communication(arch, hw, dp, ep, nodes, mem["training"]["tokens"], train_bytes,
                                           train_bytes, 3 * fwd, peak)
    out = {
        "model": arch.name,
        "hardware": {"name": hw.name, "flops": hw.flops, "flops_used": peak, "peak_used": peak_name,
                     "flops_fp8": hw.flops_fp8, "bw": hw.bw, "memory": hw.memory, "note": hw.note,
                     "link_bw": hw.link_bw, "node_bw": hw.node_bw, "gpus_per_node": hw.gpus_per_node},
        "fits": mem["inference"]["fits"],
        "memory": mem,
        "inputs": {"weights": weights, "kv_dtype": kv_dtype, "batch": batch, "context": ctx, "tokens": tokens},
        "n_layers": arch.n_layers,
        "n_moe_layers": len(arch.moe_ffns),
        "n_linear_layers": arch.attention.linear_layers if arch.attention is not None else 0,
        "params_total": sum(by_comp.values()),
        "params_active": sum(by_comp_active.values()),
        "params_by_component": by_comp,
        "params_active_by_component": by_comp_active,
        "granularity": formulas.granularity(arch.d_model, moe.d_expert) if moe else None,
        "sparsity": formulas.sparsity(moe.top_k, moe.num_experts) if moe else None,
        "flops_per_token_forward": fwd,
        "flops_per_token_forward_by_component": flops_comp,
        "flops_per_token_training": 3 * fwd,
        "flops_per_token_decode": estimate.forward_flops_per_token(arch, ctx, span=1),
        "delta_rule_flops_per_token": {"chunked": estimate.linear_mixer_flops(arch, ctx),
                                       "step": estimate.linear_mixer_flops(arch, 1)},
        "kv_bytes_per_token": estimate.kv_bytes_per_token(arch, kv_nbytes, ctx),
        "recurrent_state_bytes_per_sequence": state,
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
        "communication": communication,
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


def fit_warning(r: Dict) -> str:
    """The report's first line when the model does not fit one device at the given batch and context."""
    m, inp, hw = r["memory"], r["inputs"], r["hardware"]
    inf = m["inference"]
    state = f" + recurrent state {_b(inf['recurrent_state'])}" if inf["recurrent_state"] else ""
    what = (f"weights {_b(inf['weights'])} + KV cache {_b(inf['kv_cache'])}{state} at batch {inp['batch']} x "
            f"context {inp['context']}" if inp["context"] else f"weights {_b(inf['weights'])}")
    if inf["max_batch"] == 0:
        hint = "the weights alone do not fit"
    else:
        hint = f"batch {inf['max_batch']} fits at this context"
    return (f"WARNING: does not fit on one {hw['name']}: needs {_b(inf['total'])} ({what}), usable "
            f"{_b(m['usable'])} ({m['usable_fraction']:.0%} of {_b(m['device'])}); {hint}; needs {inf['devices']} "
            f"devices. Speeds below are as if it fit.")


def memory_rows(r: Dict) -> List[str]:
    m, inp = r["memory"], r["inputs"]
    inf, tr = m["inference"], m["training"]
    B, C = inp["batch"], inp["context"]
    mb = "unbounded (no KV cache)" if inf["max_batch"] is None else str(inf["max_batch"])
    tmb = "unbounded" if tr["max_batch"] is None else str(tr["max_batch"])
    unit = f"sequences of {C} tokens" if C else "tokens"
    pp = tr["bytes_per_param"]
    states = " + ".join(f"{k} {v}" for k, v in pp.items() if v)
    state = inf["recurrent_state"]
    plus, per_seq = (" + state", " + state per sequence") if state else ("", "")
    rows = [(f"weights ({inp['weights']})", _b(inf["weights"]), "stored bytes at the weight precision, scales included"),
            (f"KV cache (B={B}, C={C}, {inp['kv_dtype']})", _b(inf["kv_cache"]),
             "B·C·KV bytes per token" + (f" ({r['n_layers'] - r['n_linear_layers']} attention layers)" if state else "")),
            (f"recurrent state (B={B}, {r['n_linear_layers']} Gated DeltaNet layers)", _b(state),
             f"B·{_b(r['recurrent_state_bytes_per_sequence'])}: conv C·(K−1) at {inp['kv_dtype']} + Hv·Dk·Dv fp32, "
             "any context") if state else None,
            ("inference total", f"{_b(inf['total'])}: {'fits' if inf['fits'] else 'DOES NOT FIT'}",
             f"weights + KV{plus} vs usable {_b(m['usable'])} = {m['usable_fraction']:.0%} of {_b(m['device'])}"),
            (f"largest batch that fits (C={C})", mb, f"floor((usable − weights) / (C·KV bytes per token{per_seq}))"),
            ("devices needed (inference)", str(inf["devices"]), f"ceil((weights + KV{plus}) / usable)"),
            (f"training states ({tr['dtype']}, AdamW)", _b(tr["states"]),
             f"params · {sum(pp.values())} B ({states})"),
            (f"training activations ({tr['tokens']} tokens)", _b(tr["activations"]),
             f"tokens · {_b(tr['activation_bytes_per_token'])}/token (docs/formulas.md#memory)"),
            ("training total", f"{_b(tr['total'])}: {'fits' if tr['fits'] else 'DOES NOT FIT'}", "states + activations"),
            (f"training: largest batch that fits ({unit})", tmb, "floor((usable − states) / activations per sequence)"),
            ("devices needed (training)", str(tr["devices"]), "ceil((states + activations) / usable), states sharded (FSDP)")]
    return ["| memory | value | formula |", "|---|---:|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in filter(None, rows)]


def render(r: Dict) -> str:
    inp, hw = r["inputs"], r["hardware"]
    lines = [fit_warning(r)] if not r["fits"] else []
    lines += [f"# {r['model']}  on {hw['name']} ({_f(hw['flops_used'])}/s {hw['peak_used']}, {hw['bw'] / 1e9:.0f} GB/s, "
              f"{_b(hw['memory'])}{'; ' + hw['note'] if hw['note'] else ''})",
              f"weights {inp['weights']}, KV {inp['kv_dtype']}, batch {inp['batch']}, context {inp['context']}, "
              f"MoE tokens {inp['tokens']}", ""]
    lines += ["| component | params | active | weight bytes | fwd FLOPs/token |", "|---|---:|---:|---:|---:|"]
    for c, n in r["params_by_component"].items():
        if n or r["flops_per_token_forward_by_component"][c]:
            lines.append(f"| {c} | {_n(n)} | {_n(r['params_active_by_component'][c])} | {_b(r['weight_bytes_by_component'][c])} "
                         f"| {_f(r['flops_per_token_forward_by_component'][c])} |")
    lines.append(f"| **total** | **{_n(r['params_total'])}** | **{_n(r['params_active'])}** | **{_b(r['weight_bytes'])}** "
                 f"| **{_f(r['flops_per_token_forward'])}** |")
    lines += [""] + memory_rows(r)
    lines += ["", "| quantity | value | formula |", "|---|---:|---|"]
    F = r["formulas"]
    fit = "" if r["fits"] else ", if it fit"
    fit1 = "" if r["memory"]["inference"]["max_batch"] != 0 else ", if it fit"
    rows = []
    if r["granularity"] is not None:
        rows += [("granularity G", f"{r['granularity']:.4g}", F["granularity"]),
                 ("sparsity rho", f"{r['sparsity']:.4g}", F["sparsity"]),
                 (f"MoE arithmetic intensity (T={inp['tokens']})", f"{r['moe_arithmetic_intensity']:.1f} FLOP/B",
                  F["moe_arithmetic_intensity"]),
                 (f"experts touched per layer (B={inp['batch']})", f"{r['experts_touched_per_layer']:.1f}", F["experts_touched"])]
    hybrid = r["n_linear_layers"] > 0
    if hybrid:
        rows += [("layers", f"{r['n_layers'] - r['n_linear_layers']} attention + {r['n_linear_layers']} Gated DeltaNet",
                  "only the attention layers keep KV; the others a fixed state")]
    lin = r["delta_rule_flops_per_token"]
    rows += [("forward FLOPs / token", _f(r["flops_per_token_forward"]),
              F["forward_flops"] + ("; L: the attention layers, Gated DeltaNet layers add delta rule + conv" if hybrid else "")),
             (f"delta rule + conv / token / layer (chunked; decode step)", f"{_f(lin['chunked'])}; {_f(lin['step'])}",
              F["delta_rule_flops"]) if hybrid else None,
             ("training FLOPs / token", _f(r["flops_per_token_training"]),
              "3 × forward" if hybrid else F["training_flops"]),
             ("decode FLOPs / token", _f(r["flops_per_token_decode"]), "forward with the delta rule's one-token step")
             if hybrid else None,
             ("KV cache / token", _b(r["kv_bytes_per_token"]), F["kv_bytes"]),
             ("recurrent state / sequence", _b(r["recurrent_state_bytes_per_sequence"]), F["recurrent_state_bytes"])
             if hybrid else None,
             ("critical batch B*", f"{r['critical_batch']:.0f}", F["critical_batch"]),
             ("break-even batch (this model)", f"{r['break_even_batch']}" if r["break_even_batch"] else "never (memory-bound)",
              "smallest B with compute time >= memory time, experts touched + KV included"),
             (f"decode tok/s (B={inp['batch']}){fit}", f"{r['decode_tokens_per_s']:.1f} ({r['decode_bound']}-bound)",
              F["decode_time"]),
             (f"decode tok/s (B=1){fit1}", f"{r['decode_tokens_per_s_batch1']:.1f}", F["decode_bound_batch1"])
             if inp["batch"] != 1 else None,
             (f"prefill tok/s (B={inp['batch']}){fit}", f"{r['prefill_tokens_per_s']:.0f} ({r['prefill_bound']}-bound)",
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
    if r["communication"]:
        lines += [""] + communication_rows(r["communication"], r["hardware"])
    for note in r["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _s(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def communication_rows(c: Dict, hw: Dict) -> List[str]:
    """The communication section: the layout asked for, then the same dp over every EP degree."""
    F, a2a, fsdp = comm.FORMULAS, c["a2a_bytes_per_token_per_layer"], c["fsdp_bytes_per_step"]
    links = (f"NVLink/PCIe {hw['link_bw'] / 1e9:.0f} GB/s per GPU, InfiniBand {hw['node_bw'] / 1e9:.0f} GB/s "
             f"per node of {hw['gpus_per_node']}")
    lines = [f"Training communication: dp {c['dp']} GPUs on {c['nodes']} node(s) ({c['gpus_per_node']} each), "
             f"ep {c['ep']}, {c['tokens_per_rank']} tokens per GPU per step; {links}; {c['assumption']}.", "",
             "| quantity | value | formula |", "|---|---:|---|"]
    rows = [("all-to-all bytes / token / MoE layer, forward", f"{_b(a2a['forward'])} (dispatch {_b(a2a['dispatch'])}, "
             f"combine {_b(a2a['combine'])})", F["a2a_forward"]),
            ("all-to-all bytes / GPU / step (fwd + bwd)", _b(c["a2a_bytes_per_step"]), F["a2a_training"]),
            ("FSDP all-gather bytes / GPU / step", f"{_b(fsdp['all_gather_forward'])} forward + "
             f"{_b(fsdp['all_gather_backward'])} backward", F["fsdp"]),
            ("FSDP reduce-scatter bytes / GPU / step", _b(fsdp["reduce_scatter"]), "gradients at the parameter dtype"),
            ("compute / FSDP / all-to-all per step", f"{_s(c['compute_s'])} / {_s(c['fsdp_s'])} ({c['fsdp_link']}) / "
             f"{_s(c['a2a_s'])} ({c['a2a_link']})", F["link"]),
            ("step time (serial)", f"{_s(c['step_s'])} ({_s(c['step_serial_s'])})", F["step"]),
            ("training tokens/s (all GPUs)", f"{c['tokens_per_s']:.4g}", "dp · tokens per GPU / step time")]
    lines += [f"| {a} | {b} | {f} |" for a, b, f in rows]
    lines += ["", f"When expert parallelism pays off (dp {c['dp']}, same tokens per GPU; best: ep {c['best_ep']}):", "",
              "| ep | experts/GPU | all-to-all / step | FSDP / step | gathered experts / layer | all-to-all s | "
              "FSDP s | step s | tokens/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in c["by_ep"]:
        mark = "**" if e["ep"] == c["best_ep"] else ""
        lines.append(f"| {mark}{e['ep']}{mark} | {e['experts_per_rank']} | {_b(e['a2a_bytes_per_step'])} | "
                     f"{_b(e['fsdp_bytes_per_step']['total'])} | {_b(e['gathered_expert_bytes_per_layer'])} | "
                     f"{_s(e['a2a_s'])} | {_s(e['fsdp_s'])} | {_s(e['step_s'])} | {e['tokens_per_s']:.4g} |")
    return lines
