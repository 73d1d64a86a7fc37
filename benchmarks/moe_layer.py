"""MoE layer benchmark: moekit grouped vs dense FFN of equal FLOPs vs HF Qwen3-MoE.

Thin wrapper around `moekit.bench.moe_layer` (see its docstring for the FLOP count,
the baseline and the saved-bytes measurement). Run with --help for the flags.
"""

from machine import print_machine_header
from moekit.bench.moe_layer import main

if __name__ == "__main__":
    print_machine_header()
    main()
