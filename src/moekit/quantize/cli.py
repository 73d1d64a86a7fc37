"""`moekit quantize`: write a weight-only quantized copy of a checkpoint.

    moekit quantize runs/default runs/default-int4 --method int4-g64
    moekit quantize runs/default runs/default-mxfp4 --format mxfp4     (--format = --method)
    moekit generate runs/default-int4 --prompt "def "

The output is a moekit checkpoint (moekit/checkpoint.py); `load_model` returns the quantized model.
`int4` is an alias of int4-g128 (what `moekit analyze --weights int4` means).
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from .. import cliargs
from .activations import KINDS
from .formats import METHODS

ALIASES = {"int4": "int4-g128"}  # as moekit.analyze.precision's "int4"
CHOICES = (*METHODS, *ALIASES)
METHOD_HELP = (f"{', '.join(METHODS)} (int8: a scale per row; int4-gG: affine 4-bit, G values per group; "
               "q8_0/q4_0: llama.cpp blocks of 32; mxfp4: OCP MXFP4 as gpt-oss ships its experts), "
               "or int4 (= int4-g128)")


def method_name(method: str) -> str:
    """A --method/--quantize choice with its alias resolved ('int4' -> 'int4-g128')."""
    return ALIASES.get(method, method)


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """--quantize and --activations, for the commands that run a model (generate, serve)."""
    p.add_argument("--quantize", default=None, choices=CHOICES, metavar="METHOD",
                   help="weight-only quantization after loading: " + METHOD_HELP)
    p.add_argument("--activations", default="float", choices=KINDS,
                   help="q8_0: quantize activations to 8 bits inside the matmuls of q8_0/q4_0 weights, as llama.cpp "
                        "does (faster on CPUs with AVX-512 VNNI; changes the numbers slightly); default float")


def apply_runtime_arguments(model, args) -> None:
    """Quantize `model` in place as --quantize says, then set --activations (refused where no weight takes it)."""
    from .transform import quantize_model, set_activations

    if args.quantize is not None:
        quantize_model(model, method_name(args.quantize))
    if args.activations != "float":
        set_activations(model, args.activations)


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.parser("moekit quantize", "Weight-only quantization of a moekit/HF checkpoint or run directory.",
                       "examples:\n  moekit quantize runs/default runs/default-q4 --method q4_0\n"
                       "  moekit quantize --checkpoint runs/default --out runs/default-q4 --method q4_0")
    cliargs.add_model_argument(p, "source checkpoint (moekit, run dir or HF format)")
    p.add_argument("out_dir", nargs="?", default=None, metavar="OUT",
                   help="output checkpoint directory (replaced if it is a checkpoint)")
    p.add_argument("--out", default=None, metavar="DIR", help="the same as the positional OUT")
    p.add_argument("--method", "--format", dest="method", required=True, choices=CHOICES, help=METHOD_HELP)
    p.add_argument("--quantize-head", action="store_true", help="also quantize lm_head (default: kept in float)")
    p.add_argument("--experts-only", action="store_true",
                   help="quantize the routed experts only (attention, dense and shared FFNs stay float)")
    p.add_argument("--json", action="store_true", help="print the size report as JSON")
    return p


def cli(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.checkpoint is not None and args.out is None and args.out_dir is None:  # --checkpoint SRC OUT
        args.model, args.out_dir = None, args.model
    src = cliargs.model_path(args, p)
    if args.out_dir is None and args.out is None:
        p.error("give the output directory: OUT (positional) or --out DIR")
    if None not in (args.out_dir, args.out) and args.out_dir != args.out:
        p.error(f"two output directories given: {args.out_dir!r} and --out {args.out!r}; give one")
    out = args.out_dir if args.out_dir is not None else args.out
    method = method_name(args.method)
    from ..checkpoint import save_model
    from ..loading import load_model
    from .transform import model_bytes, quantize_model, size_report

    model = load_model(src)
    float_bytes = model_bytes(model)
    quantize_model(model, method, quantize_head=args.quantize_head, experts_only=args.experts_only)
    save_model(model, out)
    report = {"checkpoint": str(src), "out": str(out), "method": method, **size_report(model),
              "float_total_bytes": float_bytes}
    report["reduction"] = float_bytes / report["total_bytes"]
    if args.json:
        print(json.dumps(report))
    else:
        bits = report["bits_per_quantized_weight"]
        print(f"{method}: {report['quantized_weights'] / 1e6:.2f}M weights at {bits:.3f} bits; weights "
              f"{float_bytes / 2**20:.2f} MiB -> {report['total_bytes'] / 2**20:.2f} MiB "
              f"({report['reduction']:.2f}x reduction); wrote {out}")
    return 0
