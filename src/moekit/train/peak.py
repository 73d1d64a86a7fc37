"""The peak FLOP/s an MFU is measured against: the hardware catalog's figure for known GPUs, else the
best of several timed matmuls (a machine measured while busy gives a low peak, so the MFU of a later,
quieter stretch could exceed 100%: the trainer then reports it as unknown rather than print it).

No random numbers are drawn: measuring never changes the RNG stream a resumed run relies on.
"""

from __future__ import annotations

import time

import torch

# substrings of torch.cuda.get_device_name() -> analyze/hardware.py catalog names
GPU_NAMES = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("B200", "b200"), ("4090", "rtx4090"), ("T4", "t4"))


def catalog_peak(device: torch.device, bf16: bool):
    """The catalog's dense 16-bit peak of this GPU (bf16 training only), or None."""
    if device.type != "cuda" or not bf16:
        return None
    from ..analyze.hardware import CATALOG

    name = torch.cuda.get_device_name(device)
    return next((CATALOG[key].flops for part, key in GPU_NAMES if part in name), None)


def measured_peak(device: torch.device, bf16: bool, size: int = 1024, repeats: int = 7) -> float:
    """Best of `repeats` timings of a size³ matmul in the training dtype."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ a
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, bf16: bool) -> float:
    return catalog_peak(device, bf16) or measured_peak(device, bf16)
