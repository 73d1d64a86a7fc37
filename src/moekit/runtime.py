"""Process-level runtime settings that entry points (CLI, benchmarks) opt into explicitly.

`tune_cpu_allocator()`: glibc serves every large allocation (> 32 MiB at most) with a
fresh mmap and returns it with munmap on free, so each training step of a CPU MoE
re-faults hundreds of MiB of pages. On small (virtual) machines those page faults
can cost more than the arithmetic (`benchmarks/moe_layer.py --no-malloc-tune` shows the
effect; benchmarks/results/moe_layer_cpu.md has the measured table). Keeping
freed blocks in the heap (M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB) removes that cost
for every PyTorch op alike, at the price of the process holding on to its peak heap.
Nothing calls it on import; the `moekit` command and the benchmarks call it unless
told not to (--no-malloc-tune).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator(trim_threshold: int = 1 << 30) -> bool:
    """Keep freed large blocks for reuse (glibc only). Returns True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
