"""`moekit analyze --plot DIR`: a roofline with the model's main operations (each at its attainable
FLOP/s min(peak, AI·BW)), and decode tok/s vs batch.
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
        M, d = B * max(inp["context"], 1), arch.d_model
        ops.append((f"prefill projection, {M} tokens", 2 * M * d * d / (d * d * bpw + 2 * M * d * act_b)))
    moe = arch.moe
    if moe is not None:
        touched = formulas.experts_touched(moe.num_experts, moe.top_k, B)
        ops.append((f"decode experts, B={B}", 2 * B * moe.top_k / (touched * bpw)))
        ops.append((f"MoE layer, T={inp['tokens']}", r["moe_arithmetic_intensity"]))
    return ops


def roofline(arch: Arch, r: Dict, path: Path) -> Path:
    plt = _pyplot()
    peak, bw = r["hardware"]["flops_used"], r["hardware"]["bw"]
    ridge = peak / bw
    xs = [10 ** (i / 20) for i in range(-40, 101)]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.loglog(xs, [min(peak, x * bw) for x in xs], color="black", lw=2, label=f"roofline (ridge {ridge:.0f} FLOP/B)")
    for i, (label, ai) in enumerate(operations(arch, r)):
        ax.scatter([ai], [min(peak, ai * bw)], s=40, zorder=3)
        ax.annotate(f"{label}\n{ai:.3g} FLOP/B", (ai, min(peak, ai * bw)), textcoords="offset points",
                    xytext=(6, -24) if i % 2 == 0 else (-110, 8), fontsize=7)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(f"{r['model']} on {r['hardware']['name']} ({r['inputs']['weights']} weights)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def decode_vs_batch(arch: Arch, r: Dict, path: Path) -> Path:
    plt = _pyplot()
    inp = r["inputs"]
    prec, kvb = get_precision(inp["weights"]), dtype_bytes(inp["kv_dtype"])
    peak, bw = r["hardware"]["flops_used"], r["hardware"]["bw"]
    batches = sorted({int(round(2 ** (i / 4))) for i in range(0, 4 * 14 + 1)})
    tps = [estimate.decode(arch, prec, peak, bw, b, inp["context"], kvb)["tokens_per_s"] for b in batches]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.loglog(batches, tps, marker=".", label="decode tokens/s (all sequences)")
    be = r["break_even_batch"]
    if be:
        ax.axvline(be, color="red", ls="--", label=f"break-even batch {be} (experts touched + KV)")
    ax.axvline(r["critical_batch"], color="gray", ls=":", label=f"B* = FLOPS·bytes/(2·BW) = {r['critical_batch']:.0f}")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{r['model']} decode at context {inp['context']} on {r['hardware']['name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(arch: Arch, r: Dict, out_dir) -> List[str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [str(roofline(arch, r, out / "roofline.png")), str(decode_vs_batch(arch, r, out / "decode_vs_batch.png"))]
