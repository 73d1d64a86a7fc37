"""`moekit bench [demo|moe-layer] [options]`: dispatch to a benchmark's main()."""

from __future__ import annotations

import importlib
import sys
from typing import List

from ..runtime import tune_cpu_allocator

BENCHES = {
    "demo": "moekit.bench.demo",
    "moe-layer": "moekit.bench.moe_layer",
}


def cli(args: List[str]) -> int:
    name = "demo"
    if args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
    if name not in BENCHES:
        print(f"moekit bench: unknown benchmark {name!r}; choose one of {sorted(BENCHES)}", file=sys.stderr)
        return 2
    if "--no-malloc-tune" in args:
        args = [a for a in args if a != "--no-malloc-tune"]
    else:
        tune_cpu_allocator()
    return importlib.import_module(BENCHES[name]).main(args) or 0
