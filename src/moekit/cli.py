"""The `moekit` command line. Each subcommand lives in its own module as `cli(argv) -> int`;
this file only dispatches, so `moekit --help` imports nothing heavy."""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# name -> (module with a `cli(argv) -> int` function, one-line help)
COMMANDS = {
    "train": ("moekit.train", "train an MoE language model (default: small preset on the Python stdlib)"),
    "bench": ("moekit.bench.cli", "benchmarks: 'demo' (default) or 'moe-layer'"),
    "convert": ("moekit.hf", "convert SRC DST: re-save an HF checkpoint (dtype, expert layout, shards)"),
    "generate": ("moekit.generate", "generate text from a checkpoint (--checkpoint DIR --prompt TEXT)"),
    "plot": ("moekit.plot", "loss and expert-load PNGs of a run directory"),
    "serve": ("moekit.server.cli", "OpenAI-compatible HTTP server with continuous batching (--checkpoint DIR)"),
    "quantize": ("moekit.quantize.cli", "weight-only quantized copy of a checkpoint (int8, int4-gN, q8_0, q4_0)"),
    "analyze": ("moekit.analyze.cli", "parameters, FLOPs, bytes and hardware speed bounds of a model or MoE layer"),
    "profile": ("moekit.profile", "time per component under torch.profiler vs the analyzer's FLOPs share"),
}


def usage() -> str:
    lines = ["usage: moekit COMMAND [options]", "", "Train, analyze and serve fine-grained MoE models.", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `moekit COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moekit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.cli(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
