"""`moekit analyze --plot DIR`: a roofline with the model's main operations (each at its attainable
FLOP/s min(peak, AI·BW), named in the legend), and decode tok/s vs batch up to the largest batch whose
KV cache fits beside the weights (docs/formulas.md#memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from . import estimate, formulas
from .arch import Arch
from .precision import dtype_bytes, get_precision


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or moekit[dev])") from None
    return plt


def operations(arch: Arch, r: Dict) -> List[tuple]:
    """(label, FLOPs per byte moved) of the model's main operations under the report's inputs: decode
    projections and experts (weight traffic dominates), decode attention over the KV cache, a prefill
    d x d projection over B·C tokens, and the MoE layer (docs/formulas.md#moe-layer-arithmetic)."""
    inp = r["inputs"]
    B, bpw, kvb = inp["batch"], r["bytes_per_weight"], dtype_bytes(inp["kv_dtype"])
    act_b = 4 if inp["weights"] == "fp32" else 2
    ops = []
    if arch.attention is not None:
        a = arch.attention
        ops.append((f"decode projections/head, B={B}", 2 * B / bpw))
        if a.kind == "mla":
            score = estimate.attention_score_flops(arch, 1)
            ops.append(("decode attention (MLA latent KV)", score / ((a.kv_lora_rank + a.qk_rope_head_dim) * kvb)))
        else:
            ops.append(("decode attention over KV", 2 * (a.n_heads / a.n_kv_heads) / kvb))
        if a.linear_layers:  # the step reads and writes each sequence's state, whatever the batch
            ops.append(("decode delta rule step (state)", estimate.linear_mixer_flops(arch, 1)
                        / (2 * estimate.state_bytes_per_sequence(arch, kvb) / a.linear_layers)))
        M, d = B * max(inp["context"], 1), arch.d_model
        ops.append((f"prefill projection, {M} tokens", 2 * M * d * d / (d * d * bpw + 2 * M * d * act_b)))
    moe = arch.moe
    if moe is not None:
        touched = formulas.experts_touched(moe.num_experts, moe.top_k, B)
        ops.append((f"decode experts, B={B}", 2 * B * moe.top_k / (touched * bpw)))
        ops.append((f"MoE layer, T={inp['tokens']}", r["moe_arithmetic_intensity"]))
    return ops


def roofline_figure(arch: Arch, r: Dict):
    plt = _pyplot()
    peak, bw = r["hardware"]["flops_used"], r["hardware"]["bw"]
    ridge = peak / bw
    xs = [10 ** (i / 20) for i in range(-40, 101)]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    ax.loglog(xs, [min(peak, x * bw) for x in xs], color="black", lw=2, label=f"roofline (ridge {ridge:.0f} FLOP/B)")
    markers = "osD^vP*Xh"
    for i, (label, ai) in enumerate(operations(arch, r)):
        ax.scatter([ai], [min(peak, ai * bw)], s=60, zorder=3, marker=markers[i % len(markers)], alpha=0.85,
                   label=f"{label}: {ai:.3g} FLOP/B")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(f"{r['model']} on {r['hardware']['name']} ({r['inputs']['weights']} weights, {r['hardware']['peak_used']})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, borderaxespad=0)
    fig.tight_layout()
    return fig


def decode_vs_batch_figure(arch: Arch, r: Dict):
    plt = _pyplot()
    inp = r["inputs"]
    prec, kvb = get_precision(inp["weights"]), dtype_bytes(inp["kv_dtype"])
    peak, bw = r["hardware"]["flops_used"], r["hardware"]["bw"]
    top, label = decode_batch_limit(r)
    batches = sorted({b for b in (int(round(2 ** (i / 4))) for i in range(0, 4 * 14 + 1)) if b <= top} | {top})
    tps = [estimate.decode(arch, prec, peak, bw, b, inp["context"], kvb)["tokens_per_s"] for b in batches]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.loglog(batches, tps, marker=".", label=label)
    be = r["break_even_batch"]
    if be and be <= top:  # lines past the last batch that fits would only stretch the axis
        ax.axvline(be, color="red", ls="--", label=f"break-even batch {be} (experts touched + KV)")
    if r["critical_batch"] <= top:
        ax.axvline(r["critical_batch"], color="gray", ls=":", label=f"B* = FLOPS·bytes/(2·BW) = {r['critical_batch']:.0f}")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("tokens/s")
    fits = "" if r["fits"] else " (does not fit)"
    ax.set_title(f"{r['model']} decode at context {inp['context']} on {r['hardware']['name']}{fits}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def decode_batch_limit(r: Dict, cap: int = 1 << 14):
    """(largest batch to plot, curve label): batches whose KV cache fits beside the weights on one device;
    if the weights alone do not fit, those that fit on the devices needed for the weights, labelled so."""
    m = r["memory"]
    inf = m["inference"]
    if inf["max_batch"] is None:
        return cap, "decode tokens/s (all sequences)"
    if inf["max_batch"] >= 1:
        return min(cap, inf["max_batch"]), "decode tokens/s (all sequences; batches that fit)"
    n = -(-inf["weights"] // m["usable"])
    per_seq = (inf["kv_cache"] / r["inputs"]["batch"]) or 1
    top = max(1, min(cap, int((n * m["usable"] - inf["weights"]) // per_seq)))
    return top, f"if it fit: decode tokens/s (KV within {n:.0f} devices' memory)"


def write_plots(arch: Arch, r: Dict, out_dir) -> List[str]:
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("roofline.png", roofline_figure), ("decode_vs_batch.png", decode_vs_batch_figure)):
        fig = make(arch, r)
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(str(out / name))
    return paths
