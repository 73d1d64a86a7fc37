"""`moekit plan --flops C | --gpu-hours H [--hardware NAME] [--mfu M] [--gpus N] [--experts E] [--top-k K]
[--tokens T] [--vocab-size V] [--json] [--plot DIR] [--write-config FILE]`: the compute-optimal fine-grained
MoE of Krajewski et al. 2024 (`scaling.py`) for a budget, the dense optimum beside it, a concrete moekit
architecture counted by the analyzer's exact code, and what each granularity costs in kernels on the
hardware (arithmetic intensity against the ridge point, activation bytes per caching policy, step time).
docs/formulas.md#fine-grained-scaling-law. Imports no torch unless --write-config is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from .. import cliargs
from . import estimate, formulas, scaling
from .hardware import CATALOG, get_hardware
from .memory import USABLE
from .params import params_by_component
from .arch import FFN, Arch, Attention

ACT_BYTES = 2  # bf16 activations
BATCH_TOKENS = 2**19  # the paper's 0.5M-token batch (Appendix A)
SEQ_LEN = 2048  # the paper's sequence length


def build_parser():
    p = cliargs.parser("moekit plan", (
        "The compute-optimal fine-grained MoE for a FLOP budget under the scaling law of Krajewski et al. 2024 "
        "(arXiv:2402.07871): N, D and G, the predicted loss and the dense optimum beside it, a concrete moekit "
        "architecture, and what each granularity costs in kernels on the hardware."))
    p.add_argument("--flops", type=float, help="training budget in FLOPs (e.g. 1e21)")
    p.add_argument("--gpu-hours", type=float, help="budget in GPU-hours instead: FLOPs = hours x 3600 x peak x mfu")
    p.add_argument("--hardware", default="h100", help=f"one of {', '.join(CATALOG)}")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization of compute-bound work, in (0, 1]")
    p.add_argument("--gpus", type=int, default=1, help="devices the run uses (wall-clock = GPU-hours / gpus)")
    p.add_argument("--experts", type=int, help=f"routed experts E; the law holds at E = {scaling.EXPANSION}·G, so G = E/{scaling.EXPANSION}")
    p.add_argument("--top-k", type=int, help="experts per token K; the law routes a token to G experts, so G = K")
    p.add_argument("--tokens", type=int, default=16384,
                   help="tokens per micro-batch per device, for arithmetic intensity and activation bytes")
    p.add_argument("--vocab-size", type=int, default=50257, help="vocabulary of the concrete model (the paper: GPT-2's)")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    p.add_argument("--plot", metavar="DIR", help="write loss_vs_granularity.png and intensity_vs_granularity.png into DIR")
    p.add_argument("--write-config", metavar="FILE",
                   help="write the plan as a `moekit train --config` TOML (FILE, .toml) and an HF config.json beside "
                        "it (FILE with .json) that `moekit analyze` reads")
    return p


def budget(args) -> float:
    hw = get_hardware(args.hardware) if args.hardware in CATALOG else None
    if hw is None:
        raise ValueError(f"unknown --hardware {args.hardware!r}; choose one of {', '.join(CATALOG)}")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {args.gpus}")
    if (args.flops is None) == (args.gpu_hours is None):
        raise ValueError("give exactly one budget: --flops C or --gpu-hours H")
    if args.gpu_hours is not None:
        if not (math.isfinite(args.gpu_hours) and args.gpu_hours > 0):
            raise ValueError(f"--gpu-hours must be a positive number, got {args.gpu_hours}")
        return args.gpu_hours * 3600 * hw.flops * args.mfu
    if not (math.isfinite(args.flops) and args.flops > 0):
        raise ValueError(f"--flops must be a positive number, got {args.flops}")
    return args.flops


def granularities(experts: Optional[int], top_k: Optional[int]) -> List[int]:
    """The G values to search: the paper's, or the one --experts/--top-k fix (E = 64·G, K = G)."""
    E = scaling.EXPANSION
    for flag, value in (("--experts", experts), ("--top-k", top_k)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if experts is not None and experts % E:
        raise ValueError(f"--experts {experts} cannot hold the law's sparsity K/E = 1/{E} (E = {E}·G): "
                         f"use a multiple of {E}, e.g. {', '.join(str(E * g) for g in (1, 2, 4, 8, 16, 32, 64))}")
    if experts is not None and top_k is not None and experts != E * top_k:
        raise ValueError(f"--experts {experts} with --top-k {top_k} is a sparsity of 1/{experts / top_k:g}; the law "
                         f"holds at 1/{E}: use --experts {E * top_k} or --top-k {experts // E}")
    if top_k is not None:
        return [top_k]
    if experts is not None:
        return [experts // E]
    return list(scaling.GRANULARITIES)


def moe_arch(s: Dict) -> Arch:
    """The analyzer's `Arch` of a plan shape: MHA without biases or q/k norms, every layer MoE, untied head."""
    attn = Attention("mha", s["n_heads"], s["n_heads"], s["head_dim"])
    ffn = FFN("moe", num_experts=s["num_experts"], top_k=s["top_k"], d_expert=s["d_expert"])
    return Arch("plan", s["d_model"], s["vocab_size"], attn, (ffn,) * s["n_layers"], max_seq_len=SEQ_LEN)


def shape(p: scaling.Point, vocab_size: int) -> Dict:
    """The moekit model of a law point: d rounded to a multiple of 64 (n_layers = n_heads = d/64, head dim 64,
    MHA), SwiGLU experts of d_expert = 8d/(3G) (K·3·d·d_expert = 8d², the paper's FFN), E = 64·G, K = G."""
    d = max(scaling.WIDTH_PER_BLOCK, round(p.d_model / scaling.WIDTH_PER_BLOCK) * scaling.WIDTH_PER_BLOCK)
    G = p.G
    n_layers = d // scaling.WIDTH_PER_BLOCK
    d_expert = max(1, round(8 * d / (3 * G)))
    out = {"d_model": d, "n_layers": n_layers, "n_heads": n_layers, "head_dim": scaling.WIDTH_PER_BLOCK,
           "num_experts": scaling.EXPANSION * G, "top_k": G, "d_expert": d_expert,
           "d_ff": max(1, round(8 * d / 3)), "vocab_size": vocab_size}
    arch = moe_arch(out)
    by = params_by_component(arch)
    active = params_by_component(arch, active=True)
    law_n = by["attention"] + by["experts"]
    out.update(params=sum(by.values()), active_params=sum(active.values()), params_by_component=by,
               law_params=law_n, law_active_params=active["attention"] + active["experts"],
               granularity_sonicmoe=formulas.granularity(d, d_expert))
    return out


def kernel_cost(s: Dict, hw, mfu: float, gpus: int, T: int, tokens: float) -> Dict:
    """The MoE layer's arithmetic intensity at T tokens per device against the ridge point, its activation
    bytes per caching policy (all MoE layers), and the step time and wall-clock: expert GEMMs run at
    min(peak, AI·BW)·mfu, everything else at peak·mfu."""
    d, n, E, K, L = s["d_model"], s["d_expert"], s["num_experts"], s["top_k"], s["n_layers"]
    ai = formulas.moe_arithmetic_intensity(T, d, n, K, E)
    ridge = hw.flops / hw.bw
    attain = min(hw.flops, ai * hw.bw)
    per_layer = estimate.activation_bytes_per_moe_layer(d, n, E, K, T, ACT_BYTES)
    usable = USABLE * hw.memory
    acts = {policy: b * L for policy, b in per_layer.items()}
    flops_token = scaling.flops_per_token(d, K)
    expert_flops = scaling.C_F * 3 * d * n * K * L
    seconds_token = (flops_token - expert_flops + expert_flops * hw.flops / attain) / (hw.flops * mfu)
    return {"arithmetic_intensity": ai, "ridge": ridge, "bound": "compute" if ai >= ridge else "memory",
            "attainable_flops": attain, "activation_bytes_per_moe_layer": per_layer,
            "activation_bytes_all_moe_layers": acts, "usable_device_bytes": usable,
            "activations_fit": {policy: b <= usable for policy, b in acts.items()},
            "step_s": BATCH_TOKENS * seconds_token / gpus, "gpu_hours": tokens * seconds_token / 3600,
            "wall_clock_h": tokens * seconds_token / 3600 / gpus}


def largest(rows: List[Dict], test) -> Optional[int]:
    ok = [r["G"] for r in rows if test(r)]
    return max(ok) if ok else None


def plan(flops: float, hardware: str = "h100", mfu: float = 0.4, gpus: int = 1, experts: Optional[int] = None,
         top_k: Optional[int] = None, tokens: int = 16384, vocab_size: int = 50257) -> Dict:
    """Every number `moekit plan` prints."""
    scaling.check_budget(flops)
    if tokens < 1 or vocab_size < 1:
        raise ValueError(f"--tokens and --vocab-size must be positive integers, got {tokens} and {vocab_size}")
    hw = get_hardware(hardware)
    best, curve = scaling.optimum(flops, granularities(experts, top_k))
    dense = scaling.dense_optimum(flops)
    rows = []
    for p in curve:
        s = shape(p, vocab_size)
        rows.append({**p.as_dict(), "shape": s, "kernels": kernel_cost(s, hw, mfu, gpus, tokens, p.tokens)})
    chosen = next(r for r in rows if r["G"] == best.G)
    s = chosen["shape"]
    concrete_tokens = flops / scaling.flops_per_token(s["d_model"], best.G)
    dense_match = scaling.dense_flops_for_loss(best.loss)
    return {
        "law": {"name": "Krajewski et al. 2024 fine-grained MoE scaling law",
                "formula": "L(N, D, G) = c + (g/G^gamma + a)/N^alpha + b/D^beta",
                "moe": scaling.MOE_LAW.coefficients(), "dense": scaling.DENSE_LAW.coefficients(),
                "source": scaling.SOURCE, "c_f": scaling.C_F, "c_r": scaling.C_R, "expansion_rate": scaling.EXPANSION,
                "flops": "F = (12·d²·c_f + d·E·G·c_r)·D·n_blocks, d = 64·n_blocks"},
        "budget_flops": flops, "hardware": hw.name, "mfu": mfu, "gpus": gpus, "tokens_per_microbatch": tokens,
        "optimum": best.as_dict(), "dense": dense.as_dict(), "loss_gap": dense.loss - best.loss,
        "dense_flops_for_same_loss": dense_match if math.isfinite(dense_match) else None,
        "compute_multiplier": dense_match / flops if math.isfinite(dense_match) else None,
        "architecture": {**s, "tokens": concrete_tokens,
                         "loss": scaling.MOE_LAW.loss(s["law_params"], concrete_tokens, best.G),
                         "kernels": chosen["kernels"]},
        "granularities": rows,
        "largest_compute_bound_G": largest(rows, lambda r: r["kernels"]["bound"] == "compute"),
        "largest_G_whose_activations_fit": {policy: largest(rows, lambda r, q=policy: r["kernels"]["activations_fit"][q])
                                            for policy in ("naive", "scattermoe", "moekit")},
    }


def si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{prefix}{unit}"
    return f"{x:.3g}{unit}"


def gib(x: float) -> str:
    return f"{x / 2**30:.3g} GiB"


def render(r: Dict) -> str:
    law, o, dn, a, k = r["law"], r["optimum"], r["dense"], r["architecture"], r["architecture"]["kernels"]
    m = law["moe"]
    lines = [
        f"moekit plan: {r['budget_flops']:.3g} FLOPs on {r['hardware']} (mfu {r['mfu']:g}, {r['gpus']} device(s))",
        f"law: {law['formula']}  ({law['name']})",
        f"  MoE coefficients a={m['a']} alpha={m['alpha']} b={m['b']} beta={m['beta']} g={m['g']} gamma={m['gamma']} "
        f"c={m['c']}; dense a={law['dense']['a']} alpha={law['dense']['alpha']} b={law['dense']['b']} "
        f"beta={law['dense']['beta']} c={law['dense']['c']}",
        f"  source: {law['source']}",
        f"  FLOPs: {law['flops']}, c_f={law['c_f']}, c_r={law['c_r']}, expansion rate E={law['expansion_rate']}",
        "",
        f"compute-optimal MoE: G={o['G']}, N={si(o['params'])} ({law['expansion_rate']} x {si(o['active_params'])} active), "
        f"D={si(o['tokens'])} tokens, loss {o['loss']:.3f}",
        f"compute-optimal dense: N={si(dn['params'])}, D={si(dn['tokens'])} tokens, loss {dn['loss']:.3f} "
        f"(gap {r['loss_gap']:.3f}; dense needs "
        + (f"{r['compute_multiplier']:.1f}x the budget to match)" if r["compute_multiplier"] else "over 1e40 FLOPs to match)"),
        "",
        f"architecture: d_model={a['d_model']} n_layers={a['n_layers']} n_heads={a['n_heads']} (head_dim {a['head_dim']}, MHA) "
        f"E={a['num_experts']} K={a['top_k']} d_expert={a['d_expert']} (SwiGLU; SonicMoE G=d/n={a['granularity_sonicmoe']:.3g})",
        f"  parameters (analyzer): {a['params']:,} total, {a['active_params']:,} active, vocab {a['vocab_size']}; "
        f"law N {si(a['law_params'])}; D={si(a['tokens'])} tokens, loss {a['loss']:.3f}",
        f"  MoE layer at {r['tokens_per_microbatch']} tokens: AI {k['arithmetic_intensity']:.0f} FLOP/B vs ridge "
        f"{k['ridge']:.0f} -> {k['bound']}-bound; activations/layer naive {gib(k['activation_bytes_per_moe_layer']['naive'])}, "
        f"scattermoe {gib(k['activation_bytes_per_moe_layer']['scattermoe'])}, moekit {gib(k['activation_bytes_per_moe_layer']['moekit'])}",
        f"  step ({si(BATCH_TOKENS)} tokens) {k['step_s']:.3g} s; run {k['gpu_hours']:.3g} GPU-hours = {k['wall_clock_h']:.3g} h wall-clock",
        "",
        "   G   loss        N        D     AI  bound    activations, all MoE layers: naive / scattermoe / moekit   wall h",
    ]
    for row in r["granularities"]:
        kk = row["kernels"]
        acts = kk["activation_bytes_all_moe_layers"]
        cells = " / ".join(f"{gib(acts[q]):>10}{' ' if kk['activations_fit'][q] else '*'}"
                           for q in ("naive", "scattermoe", "moekit"))
        lines.append(f"{row['G']:>4}  {row['loss']:.3f}  {si(row['params']):>7}  {si(row['tokens']):>7}  "
                     f"{kk['arithmetic_intensity']:>5.0f}  {kk['bound']:<7}  {cells}  {kk['wall_clock_h']:.3g}"
                     + ("   <- law optimum" if row["G"] == o["G"] else ""))
    fits = r["largest_G_whose_activations_fit"]
    cb = r["largest_compute_bound_G"]
    lines += ["", (f"kernels stay compute-bound up to G={cb}" if cb else "the expert GEMMs are memory-bound at every G")
              + f" (ridge {k['ridge']:.0f} FLOP/B at {r['tokens_per_microbatch']} tokens per device; more tokens raise AI); "
              f"* = does not fit: MoE activations of one micro-batch fit {USABLE:.0%} of device memory up to G = "
              f"{fits['naive']} (naive), {fits['scattermoe']} (scattermoe), {fits['moekit']} (moekit)"]
    return "\n".join(lines)


def train_config(report: Dict) -> Dict:
    """The `moekit train --config` tables of the plan: preset tiny with the architecture's model fields, the
    paper's 0.5M-token batch (8 sequences of 2048, gradient accumulation) and steps for D tokens."""
    a = report["architecture"]
    accum = BATCH_TOKENS // (8 * SEQ_LEN)
    train = {"preset": "tiny", "vocab_size": a["vocab_size"], "seq_len": SEQ_LEN, "batch_size": 8, "grad_accum": accum,
             "max_steps": max(1, math.ceil(a["tokens"] / BATCH_TOKENS))}
    model = {"d_model": a["d_model"], "n_layers": a["n_layers"], "n_heads": a["n_heads"], "n_kv_heads": a["n_heads"],
             "head_dim": a["head_dim"], "qk_norm": "none", "d_ff": a["d_ff"], "tie_embeddings": False}
    moe = {"num_experts": a["num_experts"], "top_k": a["top_k"], "d_expert": a["d_expert"]}
    return {"train": train, "model": model, "moe": moe}


def toml_value(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)


def write_config(report: Dict, path: str) -> List[str]:
    """FILE (.toml for `moekit train --config`) and FILE with .json: the same model as an HF config.json,
    which `moekit analyze` reads (it does not read train TOMLs). Imports torch (moekit.config)."""
    toml_path = Path(path)
    if toml_path.suffix != ".toml":
        raise ValueError(f"--write-config takes a .toml file name, got {path!r}")
    from ..hf import config_to_hf, export_problems, infer_model_type
    from ..train.config import TrainConfig, model_config

    tables = train_config(report)
    values = {**tables["train"], "model": {**tables["model"], "moe": tables["moe"]}}
    cfg = model_config(TrainConfig.from_dict(values, "the plan"), tables["train"]["vocab_size"])
    model_type = infer_model_type(cfg)
    problems = export_problems(cfg, model_type)
    if problems:
        raise ValueError(f"the planned model has no HF config for moekit analyze: {'; '.join(problems)}")
    o = report["optimum"]
    head = [f"# moekit plan --flops {report['budget_flops']:.4g}: Krajewski et al. 2024 compute-optimal MoE, "
            f"G={o['G']}, D={o['tokens']:.4g} tokens, predicted loss {o['loss']:.3f}",
            f"# {report['architecture']['params']:,} parameters ({report['architecture']['active_params']:,} active)"]
    body = []
    for name, table in (("train", tables["train"]), ("model", tables["model"]), ("model.moe", tables["moe"])):
        body += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    toml_path.parent.mkdir(parents=True, exist_ok=True)
    toml_path.write_text("\n".join(head + body) + "\n")
    json_path = toml_path.with_suffix(".json")
    json_path.write_text(json.dumps(config_to_hf(cfg, model_type, "bfloat16"), indent=2) + "\n")
    return [str(toml_path), str(json_path)]


def write_plots(report: Dict, out_dir: str) -> List[str]:
    """loss_vs_granularity.png (the law's best loss at each G on the budget, optimum marked) and
    intensity_vs_granularity.png (the MoE layer's arithmetic intensity with the hardware's ridge line)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or moekit[dev])") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, o = report["granularities"], report["optimum"]
    Gs = [r["G"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(Gs, [r["loss"] for r in rows], "o-", label="MoE, best N at each G")
    ax.plot([o["G"]], [o["loss"]], "r*", markersize=14, label=f"optimum G={o['G']}")
    ax.axhline(report["dense"]["loss"], color="gray", linestyle="--", label="dense optimum")
    ax.set(xscale="log", xlabel="granularity G = d_ff / d_expert", ylabel="predicted loss",
           title=f"Krajewski et al. 2024 law at {report['budget_flops']:.3g} FLOPs")
    ax.set_xticks(Gs, [str(g) for g in Gs])
    ax.legend()
    paths.append(str(out / "loss_vs_granularity.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(Gs, [r["kernels"]["arithmetic_intensity"] for r in rows], "o-", label="MoE layer (FACTS formula)")
    ax.axhline(rows[0]["kernels"]["ridge"], color="red", linestyle="--", label=f"{report['hardware']} ridge point")
    ax.set(xscale="log", xlabel="granularity G", ylabel="FLOPs per byte",
           title=f"arithmetic intensity at {report['tokens_per_microbatch']} tokens per device")
    ax.set_xticks(Gs, [str(g) for g in Gs])
    ax.legend()
    paths.append(str(out / "intensity_vs_granularity.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def cli(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    flops = budget(args)
    report = plan(flops, args.hardware, args.mfu, args.gpus, args.experts, args.top_k, args.tokens, args.vocab_size)
    if args.write_config:
        report["config_files"] = write_config(report, args.write_config)
    if args.plot:
        report["plots"] = write_plots(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else render(report))
    if not args.json:
        for path in report.get("config_files", []) + report.get("plots", []):
            print(f"wrote {path}")
    return 0
