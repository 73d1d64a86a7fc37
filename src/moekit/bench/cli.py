"""`moekit bench [demo|moe-layer] [options]`: dispatch to a benchmark's main()."""

from __future__ import annotations

import importlib
from typing import List

from ..runtime import tune_cpu_allocator

BENCHES = {
    "demo": ("moekit.bench.demo", "train a tiny MoE layer on a teacher-student task, then time a small shape"),
    "moe-layer": ("moekit.bench.moe_layer", "forward+backward of the MoE layer vs a dense FFN and HF Qwen3-MoE"),
}


def usage() -> str:
    lines = ["usage: moekit bench [BENCHMARK] [options]   (BENCHMARK defaults to demo)", "", "benchmarks:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in BENCHES.items()]
    lines += ["", "Run `moekit bench BENCHMARK --help` for its options; every benchmark also takes --no-malloc-tune "
              "(leave glibc's allocator as it is)."]
    return "\n".join(lines)


def cli(args: List[str]) -> int:
    """`moekit bench` (errors: `moekit.cli`)."""
    if args and args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name = "demo"
    if args and not args[0].startswith("-"):
        name, args = args[0], args[1:]
    if name not in BENCHES:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHES)}")
    if "--no-malloc-tune" in args:
        args = [a for a in args if a != "--no-malloc-tune"]
    else:
        tune_cpu_allocator()
    return importlib.import_module(BENCHES[name][0]).main(args) or 0
