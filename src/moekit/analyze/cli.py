"""`moekit analyze MODEL | --layer d,n,E,K [--hardware H] [--weights P] [--batch B] [--context C] [--json] [--plot DIR]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .catalog import LAYERS, parse_layer, resolve_model
from .hardware import CHOICES
from .precision import PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit analyze", description=(
        "Parameters, FLOPs, KV/activation bytes, arithmetic intensity and the speed hardware allows, "
        "for an MoE (or dense) model. MODEL: a preset or known name, an HF config.json (file or dir), "
        "a moekit checkpoint or run directory."))
    p.add_argument("model", nargs="?", help="preset/name, config.json, or checkpoint/run directory")
    p.add_argument("--layer", help=f"a bare MoE layer d,n,E,K or a published name: {', '.join(LAYERS)}")
    p.add_argument("--hardware", default="h100", help=f"one of {', '.join(CHOICES)} (default h100)")
    p.add_argument("--weights", help=f"weight precision: {', '.join(PRECISIONS)} (default: the model's dtype)")
    p.add_argument("--kv-dtype", help="KV cache dtype: fp32, bf16, fp16, fp8, int8 (default: weights' float type)")
    p.add_argument("--batch", type=int, default=1, help="decode/prefill batch size (default 1)")
    p.add_argument("--context", type=int, default=4096, help="context length in tokens (default 4096)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per MoE batch for arithmetic intensity and activation bytes")
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
                         batch=args.batch, context=args.context, tokens=args.tokens)
        if args.plot:
            from .plots import write_plots

            report["plots"] = write_plots(arch, report, args.plot)
    except ValueError as e:
        print(f"moekit analyze: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
