"""GPU MoE-layer benchmark at SonicMoE's shapes: moekit triton vs moekit grouped vs a
torch._grouped_mm path with conventional caching, beside SonicMoE's and ScatterMoE's
published H100 figures.

What is timed: the routed experts of one MoE layer, forward and backward, for a fixed
routing (random router logits, top-K, softmax over the K chosen: balanced in
expectation, P = T*K pairs). The router GEMM (2*T*d*E FLOPs, under 2% here) is the
same for every implementation and is left out.

    moekit-triton     moekit.moe.triton.experts_triton (experts_impl="triton")
    moekit-grouped    moekit.moe.grouped.experts_grouped (experts_impl="grouped": PyTorch ops,
                      same memory policy, per-expert GEMM loop)
    torch-grouped-mm  conventional caching, torchtitan style, written here as plain autograd:
                      gather X into expert-sorted rows (each expert padded to 16 rows for
                      _grouped_mm alignment), H = grouped_mm(Xg, W13.T), A = silu(G)*U,
                      Y = grouped_mm(A, W2.T), out = index_add(S*Y); autograd keeps Xg, H,
                      silu(G), A and Y for backward.
    SonicMoE / ScatterMoE  published H100 figures (docs/formulas.md, read from bar charts:
                      +-5 TFLOPS, +-0.05 GiB), in adjacent columns; not measured here.

FLOP count (expert GEMMs only, the convention of SonicMoE's figures):
    forward   6 * d * n * T * K      (up-projection 2*d*2n, down-projection 2*n*d per pair)
    backward 12 * d * n * T * K      (2x forward: dH, dW2, dW13, dX)
TFLOPS = count / median time. Timing: CUDA events around forward and around backward,
after --warmup iterations (the first calls also autotune the Triton kernels), median of
--iters. Weight gradients are reset to None before each iteration.

Memory, per layer:
    peak GiB   torch.cuda.max_memory_allocated() during one forward+backward minus the
               memory allocated before it (inputs, weights and routing already resident;
               includes the weight gradients, whose size is in the JSON as wgrad_bytes)
    saved GiB  bytes of the tensors saved for backward, measured with
               torch.autograd.graph.saved_tensors_hooks (each storage once, weights excluded)

Before timing, each implementation's output is compared with moekit-triton's
(relative max error printed in the JSON as rel_err_vs_triton).

    python benchmarks/moe_layer_gpu.py [--iters 20] [--warmup 5] [--impls a,b,c]
                                       [--shapes "T,d,n,E,K;..."] [--json]
    python benchmarks/moe_layer_gpu.py --smoke   # tiny shapes; on a CPU machine it sets
                                                 # TRITON_INTERPRET=1 and skips CUDA-only columns

Legend: T tokens, d model dim (D), n expert dim (F), E experts, K active experts, P pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from moekit.analyze.catalog import SONICMOE_H100
from moekit.bench.memory import saved_bytes
from machine import print_machine_header

# (T, d, n, E, K)
SONIC_SHAPES: List[Tuple[int, int, int, int, int]] = list(SONICMOE_H100)
SMOKE_SHAPES: List[Tuple[int, int, int, int, int]] = [(64, 32, 16, 8, 2), (48, 64, 32, 4, 4)]

# published H100 figures (docs/formulas.md, kept in moekit.analyze.catalog): fwd/bwd TFLOPS, peak activation GiB per layer
PUBLISHED: Dict[Tuple[int, int, int, int, int], Dict[str, float]] = {
    shape: dict(sonic_fwd=v["sonicmoe"][0], sonic_bwd=v["sonicmoe"][1], sonic_gib=v["sonicmoe"][2],
                scatter_fwd=v["scattermoe"][0], scatter_bwd=v["scattermoe"][1], scatter_gib=v["scattermoe"][2])
    for shape, v in SONICMOE_H100.items()
}

ALIGN_M = 16  # rows per expert group are padded to this for torch._grouped_mm (bf16 needs >= 8)
GIB = 2**30


# ---------------------------------------------------------------- implementations


def experts_torch_grouped_mm(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P):
    """Conventional caching with torch._grouped_mm: autograd saves gathered X, H, silu(G), A and Y."""
    T, D = x_TD.shape
    E, n = w13_EFD.shape[0], w2_EDF.shape[2]
    order_P = torch.argsort(expert_idx_P, stable=True)
    exp_P, tok_P = expert_idx_P[order_P], token_idx_P[order_P]
    counts_E = torch.bincount(expert_idx_P, minlength=E)
    padded_E = (counts_E + ALIGN_M - 1) // ALIGN_M * ALIGN_M
    ends_E = torch.cumsum(padded_E, 0)
    rank_P = torch.arange(exp_P.numel(), device=x_TD.device) - (torch.cumsum(counts_E, 0) - counts_E)[exp_P]
    row_P = (ends_E - padded_E)[exp_P] + rank_P
    rows = int(ends_E[-1]) if E else 0
    tok_R = torch.full((rows,), T, dtype=tok_P.dtype, device=x_TD.device)  # padding rows read row T (zeros)
    tok_R[row_P] = tok_P
    gates_R = torch.zeros(rows, dtype=x_TD.dtype, device=x_TD.device)
    gates_R = gates_R.index_put((row_P,), gates_P[order_P].to(x_TD.dtype))  # differentiable
    offs_E = ends_E.to(torch.int32)

    xg_RD = F.pad(x_TD, (0, 0, 0, 1))[tok_R]  # gathered X (saved by the GEMM below)
    h_R2F = torch._grouped_mm(xg_RD, w13_EFD.transpose(-2, -1), offs=offs_E)
    a_RF = F.silu(h_R2F[:, :n]) * h_R2F[:, n:]
    y_RD = torch._grouped_mm(a_RF, w2_EDF.transpose(-2, -1), offs=offs_E)
    out = torch.zeros(T + 1, D, dtype=x_TD.dtype, device=x_TD.device).index_add(0, tok_R, y_RD * gates_R[:, None])
    return out[:T]


def get_impls(names: List[str]) -> Dict[str, Callable]:
    from moekit.moe.grouped import experts_grouped
    from moekit.moe.triton import experts_triton

    impls = {"moekit-triton": experts_triton, "moekit-grouped": experts_grouped,
             "torch-grouped-mm": experts_torch_grouped_mm}
    unknown = [n for n in names if n not in impls]
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; choose from {sorted(impls)}")
    return {n: impls[n] for n in names}


# ---------------------------------------------------------------- inputs and measurements


def make_inputs(T, d, n, E, K, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, d, generator=g).to(device, dtype)
    w13 = (torch.randn(E, 2 * n, d, generator=g) * d**-0.5).to(device, dtype)
    w2 = (torch.randn(E, d, n, generator=g) * n**-0.5).to(device, dtype)
    logits = torch.randn(T, E, generator=g).to(device)
    top_logits, top_idx = logits.topk(K, dim=1)
    gates = torch.softmax(top_logits, dim=1).reshape(-1)  # float32 gates, as the routers give
    tok = torch.arange(T, device=device).repeat_interleave(K)
    exp = top_idx.reshape(-1)
    dout = torch.randn(T, d, generator=g).to(device, dtype)
    for t in (x, w13, w2, gates):
        t.requires_grad_(True)
    return (x, w13, w2, gates, tok, exp), dout


def reset_grads(args) -> None:
    for t in args[:4]:
        t.grad = None


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, args, dout, iters: int, warmup: int, device) -> Tuple[float, float]:
    """Median forward and backward milliseconds."""
    fwd, bwd = [], []
    for i in range(warmup + iters):
        reset_grads(args)
        sync(device)
        if device.type == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            y = fn(*args)
            ev[1].record()
            y.backward(dout)
            ev[2].record()
            torch.cuda.synchronize()
            f, b = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        else:
            t0 = time.perf_counter()
            y = fn(*args)
            t1 = time.perf_counter()
            y.backward(dout)
            t2 = time.perf_counter()
            f, b = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        del y
        if i >= warmup:
            fwd.append(f)
            bwd.append(b)
    return statistics.median(fwd), statistics.median(bwd)


def peak_bytes(fn, args, dout, device) -> Optional[int]:
    if device.type != "cuda":
        return None
    reset_grads(args)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args).backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    reset_grads(args)
    return peak


def saved_activation_bytes(fn, args) -> int:
    """Bytes fn(*args) saves for backward, the weights args[1:3] excluded."""
    nbytes, y = saved_bytes(lambda: fn(*args), params=args[1:3])
    del y
    return nbytes


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- environment


def environment(device) -> Dict[str, str]:
    env = {"torch": torch.__version__, "device": str(device), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    else:
        env["driver"] = "n/a (CPU, TRITON_INTERPRET=1)"
    try:
        env["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                                       capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    return env


# ---------------------------------------------------------------- table


def fmt(v, spec) -> str:
    return "-" if v is None else format(v, spec)


def format_table(env: Dict[str, str], rows: List[dict]) -> str:
    head = [
        f"device: {env['device']}  driver: {env.get('driver')}  cuda: {env.get('cuda', '-')}  "
        f"torch: {env['torch']}  triton: {env['triton']}  commit: {env['commit']}",
        f"command: {env['command']}",
        "FLOPs: fwd 6*d*n*T*K, bwd 12*d*n*T*K (expert GEMMs). peak = max_memory_allocated delta over fwd+bwd "
        "(weight grads included); saved = saved_tensors_hooks bytes. SonicMoE/ScatterMoE: published H100 figures.",
        "",
        "| T | d | n | E | K | impl | fwd ms | fwd TFLOPS | bwd ms | bwd TFLOPS | peak GiB | saved GiB "
        "| SonicMoE fwd/bwd TFLOPS | SonicMoE GiB | ScatterMoE fwd/bwd TFLOPS | ScatterMoE GiB |",
        "|" + "---|" * 16,
    ]
    lines = []
    for r in rows:
        pub = PUBLISHED.get(tuple(r["shape"]))
        sonic = f"{pub['sonic_fwd']:.0f}/{pub['sonic_bwd']:.0f}" if pub else "-"
        scatter = f"{pub['scatter_fwd']:.0f}/{pub['scatter_bwd']:.0f}" if pub else "-"
        if r.get("error"):
            cells = [r["impl"], f"error: {r['error']}"] + ["-"] * 7
        else:
            cells = [
                r["impl"], fmt(r["fwd_ms"], ".3f"), fmt(r["fwd_tflops"], ".1f"), fmt(r["bwd_ms"], ".3f"),
                fmt(r["bwd_tflops"], ".1f"),
                fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / GIB, ".3f"),
                fmt(r["saved_bytes"] / GIB, ".3f"),
            ]
        cells += [sonic, fmt(pub["sonic_gib"] if pub else None, ".2f"),
                  scatter, fmt(pub["scatter_gib"] if pub else None, ".2f")]
        lines.append("| " + " | ".join([str(v) for v in r["shape"]] + cells[:11]) + " |")
    return "\n".join(head + lines)


# ---------------------------------------------------------------- main


def parse_shapes(text: str) -> List[Tuple[int, int, int, int, int]]:
    shapes = []
    for part in text.split(";"):
        vals = tuple(int(v) for v in part.split(","))
        if len(vals) != 5:
            raise SystemExit(f"--shapes wants T,d,n,E,K groups separated by ';', got {part!r}")
        shapes.append(vals)
    return shapes


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=str, default=None, help="T,d,n,E,K;... (default: SonicMoE's three shapes)")
    p.add_argument("--impls", type=str, default="moekit-triton,moekit-grouped,torch-grouped-mm")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 iterations (CPU: TRITON_INTERPRET=1)")
    p.add_argument("--json", action="store_true", help="print JSON (environment + rows) instead of the table")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            raise SystemExit("this benchmark needs a CUDA GPU; --smoke runs tiny shapes on the CPU interpreter")
        os.environ["TRITON_INTERPRET"] = "1"  # before moekit's triton kernels are imported
    device = torch.device("cuda" if cuda else "cpu")
    shapes = parse_shapes(args.shapes) if args.shapes else (SMOKE_SHAPES if args.smoke else SONIC_SHAPES)
    iters, warmup = (2, 1) if args.smoke else (args.iters, args.warmup)
    dtype = getattr(torch, args.dtype)
    impls = get_impls([s for s in args.impls.split(",") if s])
    env = environment(device)

    rows = []
    for shape in shapes:
        T, d, n, E, K = shape
        inputs, dout = make_inputs(T, d, n, E, K, dtype, device)
        fwd_flops, bwd_flops = 6 * d * n * T * K, 12 * d * n * T * K
        ref = None
        for name, fn in impls.items():
            row = dict(shape=list(shape), impl=name, dtype=args.dtype, fwd_flops=fwd_flops, bwd_flops=bwd_flops,
                       x_bytes=T * d * inputs[0].element_size(), h_bytes=T * K * 2 * n * inputs[0].element_size(),
                       wgrad_bytes=(inputs[1].numel() + inputs[2].numel()) * inputs[1].element_size())
            try:
                with torch.no_grad():
                    y = fn(*inputs)
                if ref is None:
                    ref = y
                row["rel_err_vs_triton"] = rel_err(y, ref) if "moekit-triton" in impls else None
                del y
                fwd_ms, bwd_ms = time_fwd_bwd(fn, inputs, dout, iters, warmup, device)
                row.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                           fwd_tflops=fwd_flops / fwd_ms / 1e9, bwd_tflops=bwd_flops / bwd_ms / 1e9,
                           peak_bytes=peak_bytes(fn, inputs, dout, device), saved_bytes=saved_activation_bytes(fn, inputs))
            except (RuntimeError, NotImplementedError, ValueError) as err:  # e.g. an op missing on this build
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            row.update({k: v for k, v in (PUBLISHED.get(shape) or {}).items()})
            rows.append(row)
            if not args.json:
                print(f"done {shape} {name}", file=sys.stderr)
        del inputs, dout, ref
        if cuda:
            torch.cuda.empty_cache()

    if args.json:
        print(json.dumps({"environment": env, "rows": rows}, indent=2))
    else:
        print(format_table(env, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
