"""The `moekit` command line.

    moekit bench                 train the tiny MoE layer on a toy task, then print a benchmark table
    moekit bench moe-layer ...   the MoE layer benchmark (see benchmarks/moe_layer.py)

Later work items add train, generate, analyze, profile, convert and serve.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

BENCHES = {
    "demo": "moekit.bench.demo",
    "moe-layer": "moekit.bench.moe_layer",
}


def _bench(args: List[str]) -> int:
    name = "demo"
    if args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
    if name not in BENCHES:
        print(f"moekit bench: unknown benchmark {name!r}; choose one of {sorted(BENCHES)}", file=sys.stderr)
        return 2
    import importlib

    from .runtime import tune_cpu_allocator

    if "--no-malloc-tune" in args:
        args = [a for a in args if a != "--no-malloc-tune"]
    else:
        tune_cpu_allocator()
    module = importlib.import_module(BENCHES[name])
    return module.main(args) or 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moekit", description="Train, analyze and serve fine-grained MoE models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "bench",
        help="benchmarks: 'demo' (default) or 'moe-layer'",
        description="moekit bench [demo|moe-layer] [options]; options go to the chosen benchmark (try --help after its name).",
        add_help=False,
    )
    ns, rest = parser.parse_known_args(argv)
    if ns.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
