"""`moekit quantize`: write a weight-only quantized copy of a checkpoint.

    moekit quantize --checkpoint runs/default --method int4-g64 --out runs/default-int4
    moekit generate --checkpoint runs/default-int4 --prompt "def "

The output is a moekit checkpoint (moekit/checkpoint.py); `load_model` returns the quantized model.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .formats import METHODS, get_format


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit quantize",
                                description="Weight-only quantization of a moekit/HF checkpoint or run directory.")
    p.add_argument("--checkpoint", required=True, help="source checkpoint (moekit, run dir or HF format)")
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="output checkpoint directory (replaced if it is a checkpoint)")
    p.add_argument("--quantize-head", action="store_true", help="also quantize lm_head (default: kept in float)")
    p.add_argument("--json", action="store_true", help="print the size report as JSON")
    return p


def cli(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..checkpoint import save_model
        from ..loading import load_model
        from .transform import model_bytes, quantize_model, size_report

        get_format(args.method)  # fail before loading
        model = load_model(args.checkpoint)
        float_bytes = model_bytes(model)
        quantize_model(model, args.method, quantize_head=args.quantize_head)
        save_model(model, args.out)
        report = {"checkpoint": str(args.checkpoint), "out": str(args.out), **size_report(model),
                  "float_total_bytes": float_bytes}
        report["reduction"] = float_bytes / report["total_bytes"]
    except (ValueError, OSError) as err:
        print(f"moekit quantize: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        bits = report["bits_per_quantized_weight"]
        print(f"{args.method}: {report['quantized_weights'] / 1e6:.2f}M weights at {bits:.3f} bits; weights "
              f"{float_bytes / 2**20:.2f} MiB -> {report['total_bytes'] / 2**20:.2f} MiB "
              f"({report['reduction']:.2f}x reduction); wrote {args.out}")
    return 0
