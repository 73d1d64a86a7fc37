"""What machine a benchmark ran on: every script prints `machine_header()` at the top of its output."""

from __future__ import annotations

import os
import platform
import sys

# CPU flags that change which kernels torch can use (vector width, bf16 dot products, AMX tiles)
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def machine_info() -> dict:
    """CPU model, core count, flags of interest (from /proc/cpuinfo where there is one), torch
    version and the CUDA device's name (None without one)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags and line.strip() == "":
                    break  # the first processor block says it all
    except OSError:
        pass
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flags": [flag for flag in FLAGS_OF_INTEREST if flag in flags],
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def machine_header(info: dict = None) -> str:
    """Markdown lines naming the machine, for the top of a benchmark's output."""
    info = info or machine_info()
    return (f"Machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), "
            f"flags: {' '.join(info['flags']) or 'none of ' + ' '.join(FLAGS_OF_INTEREST)}  \n"
            f"torch {info['torch']}, GPU: {info['cuda_device'] or 'none'}\n")


def print_machine_header(argv=None) -> None:
    """The header on stdout, or on stderr when the script prints JSON (`--json` in argv), so the JSON
    stays parseable."""
    argv = sys.argv[1:] if argv is None else argv
    print(machine_header(), file=sys.stderr if "--json" in argv else sys.stdout, flush=True)


if __name__ == "__main__":
    print_machine_header()
