"""Hardware: peak dense 16-bit FLOP/s and memory bandwidth (the table in docs/formulas.md), or measured
locally.

`local_hardware()` measures this machine with a short micro-benchmark:
  - FLOP/s: the best of a few square matmuls (2*N^3 FLOPs each) in bf16 and in fp32,
    on CUDA when a GPU is present, else on the CPU with all of torch's threads;
  - bandwidth: the best of a few reads of a 256 MiB tensor (`sum`, bytes read / time),
    i.e. the read bandwidth a memory-bound decode step sees.
Catalog entries give one 16-bit peak; `flops_fp32` is None there and the analyzer uses
the 16-bit figure (state it), while local measurement gives both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # peak dense bf16/fp16 FLOP/s
    bw: float  # memory bandwidth, bytes/s
    flops_fp32: Optional[float] = None  # measured only (local)
    note: str = ""

    def peak_flops(self, fp32: bool) -> float:
        return self.flops_fp32 if (fp32 and self.flops_fp32) else self.flops


CATALOG = {
    "a100": Hardware("a100", 312e12, 1.935e12, note="A100 SXM"),
    "h100": Hardware("h100", 989e12, 3.35e12, note="H100 SXM"),
    "h200": Hardware("h200", 989e12, 4.8e12),
    "b200": Hardware("b200", 2.25e15, 8.0e12),
    "rtx4090": Hardware("rtx4090", 82.6e12, 1.008e12),
    "t4": Hardware("t4", 65e12, 320e9, note="65 TFLOPS is fp16 tensor-core, not fp32"),
    "m1": Hardware("m1", 5.5e12, 68.25e9, note="M1 GPU"),
    "m2-max": Hardware("m2-max", 13.6e12, 400e9),
    "rpi4": Hardware("rpi4", 13.5e9, 4e9),
}
CHOICES = tuple(CATALOG) + ("local",)

_LOCAL: Optional[Hardware] = None


def get_hardware(name) -> Hardware:
    if isinstance(name, Hardware):
        return name
    if name == "local":
        return local_hardware()
    if name not in CATALOG:
        raise ValueError(f"unknown --hardware {name!r}; choose one of {', '.join(CHOICES)}")
    return CATALOG[name]


def _best_seconds(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_flops(dtype, n: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats, sync)


def measure_read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5, device: str = "cpu") -> float:
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return nbytes / _best_seconds(lambda: x.sum(), repeats, sync)


def local_hardware(refresh: bool = False) -> Hardware:
    """This machine, measured once per process (see the module docstring)."""
    global _LOCAL
    if _LOCAL is None or refresh:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        n = 4096 if device == "cuda" else 1024
        f16 = measure_matmul_flops(torch.bfloat16, n, device=device)
        f32 = measure_matmul_flops(torch.float32, n, device=device)
        bw = measure_read_bandwidth(device=device)
        where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        _LOCAL = Hardware("local", f16, bw, flops_fp32=f32, note=f"measured: {where}")
    return _LOCAL
