"""`moekit analyze MODEL | --layer d,n,E,K [--hardware H] [--memory GIB] [--weights P] [--kv-dtype D] [--batch B]
[--context C] [--tokens T] [--dp D] [--ep E] [--nodes N] [--json] [--plot DIR]`. Imports no torch for presets,
names and config.json files.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from .. import cliargs
from .catalog import LAYERS, parse_layer, resolve_model
from .hardware import CHOICES
from .memory import USABLE
from .precision import NAMES_HELP


def build_parser():
    p = cliargs.parser("moekit analyze", (
        "Parameters, FLOPs, KV/activation bytes, arithmetic intensity, the memory needed (inference and "
        "training) against the device's, and the speed hardware allows, for an MoE (or dense) model. "
        "MODEL: a preset or known name, an HF config.json (file or dir), a moekit checkpoint or run directory."))
    p.add_argument("model", nargs="?", help="preset/name, config.json, or checkpoint/run directory")
    p.add_argument("--layer", help=f"a bare MoE layer d,n,E,K or a published name: {', '.join(LAYERS)}")
    p.add_argument("--hardware", default="h100", help=f"one of {', '.join(CHOICES)}")
    p.add_argument("--memory", type=float, metavar="GIB",
                   help=f"device memory in GiB instead of the hardware's ({USABLE * 100:.0f}%% of it counts as usable)")
    p.add_argument("--weights", help=f"weight precision: {NAMES_HELP} (default: the model's dtype)")
    p.add_argument("--kv-dtype", help="KV cache dtype: fp32, bf16, fp16, fp8, int8 (default: weights' float type)")
    p.add_argument("--batch", type=int, default=1, help="decode/prefill/training batch size (sequences)")
    p.add_argument("--context", type=int, default=4096, help="context length in tokens")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per MoE batch for arithmetic intensity and activation bytes")
    p.add_argument("--dp", type=int, help="training communication on D data-parallel GPUs (FSDP); default: --ep, "
                   "or --nodes full nodes")
    p.add_argument("--ep", type=int, help="expert-parallel degree E (divides --dp and num_experts; default 1)")
    p.add_argument("--nodes", type=int, help="nodes the --dp GPUs span (default: as few as hold them)")
    p.add_argument("--precision", help="also the low-precision training table (analyze/lowp.py): 'all' or one "
                   "recipe (none, fp8-tensorwise, fp8-rowwise, fp8-blockwise, mxfp8, mxfp4-bwd[:options])")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="DIR", help="write roofline.png and decode_vs_batch.png into DIR")
    return p


def cli(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .report import analyze, render

    try:
        if (args.model is None) == (args.layer is None):
            raise ValueError("give exactly one of MODEL or --layer d,n,E,K")
        arch = parse_layer(args.layer) if args.layer else resolve_model(args.model)
        report = analyze(arch, hardware=args.hardware, weights=args.weights, kv_dtype=args.kv_dtype,
                         batch=args.batch, context=args.context, tokens=args.tokens, memory_gib=args.memory,
                         dp=args.dp, ep=args.ep, nodes=args.nodes)
        if args.precision:
            from .lowp import lowp_rows

            rows = lowp_rows(arch, args.hardware if args.hardware != "local" else "local")
            if args.precision != "all":
                from ..lowp.recipes import get_recipe

                name = getattr(get_recipe(args.precision), "name", "none")
                rows = [r for r in rows if r["precision"] in ("none", name)]
            report["lowp"] = rows
        if args.plot:
            from .plots import write_plots

            report["plots"] = write_plots(arch, report, args.plot)
    except ValueError as e:
        print(f"moekit analyze: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render(report))
    if "lowp" in report and not args.json:
        from .lowp import render_lowp

        print("\n" + render_lowp(report["lowp"], args.hardware))
    return 0
