"""Hardware: peak dense FLOP/s (16-bit, and fp8 where the chip has it), memory bandwidth, device memory
and interconnect (docs/formulas.md#hardware), or measured locally; only measurement gives a separate fp32
peak. Interconnect figures are per direction: `link_bw` GPU to GPU inside a node (NVLink, or PCIe where a
chip has no NVLink), `node_bw` a node's InfiniBand to other nodes, shared by its `gpus_per_node` GPUs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

GIB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    name: str
    flops: float  # peak dense bf16/fp16 FLOP/s
    bw: float  # memory bandwidth, bytes/s
    memory: float = 0.0  # device memory, bytes (0: unknown)
    flops_fp8: Optional[float] = None  # peak dense fp8 FLOP/s, where the chip has fp8 tensor cores
    flops_fp4: Optional[float] = None  # peak dense fp4 (MXFP4/NVFP4) FLOP/s, where the chip has fp4 tensor cores
    flops_fp32: Optional[float] = None  # measured only (local)
    note: str = ""
    link_bw: float = 0.0  # GPU to GPU inside a node, bytes/s per GPU per direction (0: unknown)
    node_bw: float = 0.0  # one node to the others (InfiniBand), bytes/s per node per direction (0: unknown)
    gpus_per_node: int = 1

    def peak(self, weights: str) -> Tuple[float, str]:
        """(FLOP/s, which peak) for matmuls with `weights`: fp8 weights run fp8 GEMMs where the chip has them;
        fp32 uses the measured fp32 peak (local only); everything else, weight-only formats included
        (dequantized to 16-bit before the matmul), the 16-bit peak."""
        if weights == "fp8" and self.flops_fp8:
            return self.flops_fp8, "fp8 dense"
        if weights == "fp32" and self.flops_fp32:
            return self.flops_fp32, "fp32 (measured)"
        why = {"fp8": " (no fp8 peak for this hardware)", "fp32": " (no fp32 peak for this hardware)"}.get(weights, "")
        if weights not in ("fp8", "fp32", "bf16", "fp16"):
            why = f" ({weights} weights are dequantized to 16-bit for the matmul)"
        return self.flops, "bf16/fp16 dense" + why


# Peaks and bandwidths: docs/formulas.md#hardware. Memory: the datasheet capacity taken as GiB (what the
# driver reports is within 1% of it; the analyzer's 90% usable headroom covers the rest).
NVLINK3, NVLINK4, NVLINK5 = 300e9, 450e9, 900e9  # per GPU per direction: 600 / 900 / 1800 GB/s both ways
HDR8, NDR8 = 8 * 25e9, 8 * 50e9  # a DGX node's 8 compute NICs: 8 x 200 Gb/s HDR, 8 x 400 Gb/s NDR
CATALOG = {
    "a100": Hardware("a100", 312e12, 1.935e12, 80 * GIB, note="A100 SXM 80GB",
                     link_bw=NVLINK3, node_bw=HDR8, gpus_per_node=8),
    "h100": Hardware("h100", 989e12, 3.35e12, 80 * GIB, flops_fp8=1979e12, note="H100 SXM",
                     link_bw=NVLINK4, node_bw=NDR8, gpus_per_node=8),
    "h200": Hardware("h200", 989e12, 4.8e12, 141 * GIB, flops_fp8=1979e12, link_bw=NVLINK4, node_bw=NDR8,
                     gpus_per_node=8),
    # B200 FP4 dense 9 PFLOPS: NVIDIA DGX B200 datasheet (72 PF FP8 / 144 PF FP4 training+inference per 8 GPUs,
    # sparse; dense is half). H100/H200 have no FP4 tensor cores (FP8 peak 1979 TFLOPS dense: H100 datasheet).
    "b200": Hardware("b200", 2.25e15, 8.0e12, 180 * GIB, flops_fp8=4.5e15, flops_fp4=9e15, link_bw=NVLINK5,
                     node_bw=NDR8, gpus_per_node=8),
    "rtx4090": Hardware("rtx4090", 82.6e12, 1.008e12, 24 * GIB, link_bw=32e9, gpus_per_node=8),  # PCIe 4.0 x16
    "t4": Hardware("t4", 65e12, 320e9, 16 * GIB, note="65 TFLOPS is fp16 tensor-core, not fp32",
                   link_bw=16e9, gpus_per_node=8),  # PCIe 3.0 x16
    "m1": Hardware("m1", 5.5e12, 68.25e9, 16 * GIB, note="M1 GPU, 16 GB unified memory"),
    "m2-max": Hardware("m2-max", 13.6e12, 400e9, 32 * GIB, note="32 GB unified memory"),
    "rpi4": Hardware("rpi4", 13.5e9, 4e9, 8 * GIB, note="8 GB model"),
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
    CUDA when present, else on the CPU with all of torch's threads; memory is the GPU's total memory,
    or the machine's physical RAM."""
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
        memory = (torch.cuda.get_device_properties(0).total_memory if device == "cuda"
                  else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        _LOCAL = Hardware("local", flops[0], bw, float(memory), flops_fp32=flops[1], note=f"measured: {where}")
    return _LOCAL
