"""Hardware: peak dense 16-bit FLOP/s and memory bandwidth (docs/formulas.md#hardware), or measured
locally; only measurement gives a separate fp32 peak."""

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


def local_hardware(refresh: bool = False) -> Hardware:
    """This machine, measured once per process: the best of 5 square matmuls (2·n³ FLOPs) in bf16 and in
    fp32, and of 5 reads of a 256 MiB tensor (the read bandwidth a memory-bound decode step sees), on
    CUDA when present, else on the CPU with all of torch's threads."""
    global _LOCAL
    if _LOCAL is None or refresh:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        n, nbytes = (4096 if device == "cuda" else 1024), 256 << 20
        flops = []  # bf16, fp32
        for dtype in (torch.bfloat16, torch.float32):
            a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
            flops.append(2 * n**3 / _best_seconds(lambda: torch.mm(a, b), 5, sync))
        x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        bw = nbytes / _best_seconds(lambda: x.sum(), 5, sync)
        where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        _LOCAL = Hardware("local", flops[0], bw, flops_fp32=flops[1], note=f"measured: {where}")
    return _LOCAL
