"""MoE layer benchmark: moekit grouped experts vs a dense FFN of equal FLOPs vs HF Qwen3-MoE.

For every shape (T, D, F, E, K) and dtype it times forward+backward on the same input (CPU):
    moekit-grouped  MoE(softmax_topk, norm_topk_prob=True, experts_impl="grouped"), x requires grad
    dense-ffn       the peer: ONE dense SwiGLU FFN over M = T*K rows, i.e. exactly the MoE's
                    expert GEMM work with perfect batching (no routing, gather, scatter or
                    per-expert loop); x_MD requires grad, so backward runs the same 4 GEMMs
    hf-qwen3moe     transformers' Qwen3MoeSparseMoeBlock (eager per-expert loop) holding the
                    moekit layer's weights; the outputs are checked to agree before timing

FLOPs, expert GEMMs only (formulas.md): forward 6*P*D*F, backward twice that, 18*T*K*D*F in
all, for every row. "frac of dense" = GFLOP/s / dense-ffn GFLOP/s at the same shape and dtype
(target for moekit-grouped: >= 0.85); the header gives a 2048^3 matmul's rate per dtype.
"saved MiB" = `memory.saved_bytes` of one forward; the JSON rows also give x_bytes (T*D*elem)
and h_bytes (T*K*2F*elem): the grouped backend's contract is saved ~= x_bytes + h_bytes + small.

    python benchmarks/moe_layer.py [--shapes "4096,512,128,64,8;..."] [--json] (--help: the rest)

Legend: T tokens, D model dim (d), F expert dim (n), E experts, K active experts,
M = T*K rows of the dense peer, P token-expert pairs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import MoEConfig
from .. import cliargs
from ..hf.io import dtype_name, resolve_dtype
from ..moe import MoE
from ..runtime import tune_cpu_allocator
from .memory import saved_bytes

# (T, D, F, E, K)
DEFAULT_SHAPES: List[Tuple[int, int, int, int, int]] = [(4096, 512, 128, 64, 8), (4096, 512, 64, 256, 8),
                                                         (4096, 1024, 256, 32, 4)]
DEFAULT_DTYPES = ("float32", "bfloat16")
# HF-vs-moekit output agreement before timing: max|dy| <= tol * max|y_moekit|
_AGREE_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}

IMPL_MOEKIT, IMPL_DENSE, IMPL_HF = "moekit-grouped", "dense-ffn", "hf-qwen3moe"
MiB = 2**20


def moe_flops(T: int, D: int, F: int, K: int) -> int:
    """Expert-GEMM FLOPs of one forward+backward: 18 * T*K * D*F."""
    return 18 * T * K * D * F


# --------------------------------------------------------------------------- measurement
def _measure(fwd, x: torch.Tensor, dy: torch.Tensor, params: Sequence[torch.Tensor], warmup: int, iters: int) -> dict:
    """Saved-for-backward bytes and median forward+backward time (ms) of fwd on x; the saved-bytes
    pass is itself a full forward+backward and counts as the first warmup."""

    def clear_grads():
        x.grad = None
        for p in params:
            p.grad = None

    clear_grads()
    saved, y = saved_bytes(lambda: fwd(x), params)
    y.backward(dy)
    del y
    for _ in range(max(warmup - 1, 0)):
        clear_grads()
        fwd(x).backward(dy)
    times_ms = []
    for _ in range(iters):
        clear_grads()
        t0 = time.perf_counter()
        fwd(x).backward(dy)
        times_ms.append((time.perf_counter() - t0) * 1e3)
    clear_grads()
    return {"ms": statistics.median(times_ms), "ms_all": times_ms, "saved_bytes": saved}


def square_gemm_gflops(dtype: torch.dtype, size: int = 2048, iters: int = 3) -> float:
    """Forward rate of one size^3 matmul in dtype (median of iters after one warmup)."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------- implementations
class DenseSwiGLU(torch.nn.Module):
    """The peer: one SwiGLU FFN over M rows with the expert GEMM shapes (w13 gate rows first)."""

    def __init__(self, D: int, F_: int):
        super().__init__()
        self.w13_2FD = torch.nn.Parameter(torch.randn(2 * F_, D) * D**-0.5)
        self.w2_DF = torch.nn.Parameter(torch.randn(D, F_) * F_**-0.5)

    def forward(self, x_MD: torch.Tensor) -> torch.Tensor:
        h_M2F = x_MD @ self.w13_2FD.t()
        g_MF, u_MF = h_M2F.chunk(2, dim=-1)
        a_MF = F.silu(g_MF) * u_MF
        return a_MF @ self.w2_DF.t()


def hf_unavailable_reason() -> Optional[str]:
    """None when transformers' Qwen3-MoE block can be imported, else why not."""
    try:
        from transformers import Qwen3MoeConfig  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: F401
    except ImportError as exc:
        return f"transformers Qwen3-MoE not importable ({exc})"
    return None


def build_hf_from_moekit(moe: MoE):
    """(Qwen3MoeSparseMoeBlock with the eager expert loop and moe's exact weights,
    the experts implementation it actually dispatches to)."""
    from transformers import Qwen3MoeConfig
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    c = moe.cfg
    # transformers 5 dispatches Qwen3MoeExperts.forward through @use_experts_implementation on
    # config._experts_implementation ("eager" | "grouped_mm" | "batched_mm" | ...); "eager" keeps
    # the original per-expert loop.
    hf_cfg = Qwen3MoeConfig(
        hidden_size=c.d_model, moe_intermediate_size=c.d_expert, num_experts=c.num_experts,
        num_experts_per_tok=c.top_k, norm_topk_prob=True, experts_implementation="eager",
    )
    block = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        # HF: gate, up = linear(x, gate_up_proj[e]).chunk(2) -> rows [:F] gate, [F:] up, as moekit's w13
        block.experts.gate_up_proj.copy_(moe.experts.w13)
        block.experts.down_proj.copy_(moe.experts.w2)
    name = block.experts.config._experts_implementation
    forward = type(block.experts).forward
    fn = ALL_EXPERTS_FUNCTIONS.get_interface(name, getattr(forward, "__wrapped__", forward))
    return block, f"{name} ({fn.__qualname__})"


# --------------------------------------------------------------------------- the run
def _row(shape, dtype, impl, flops, meas, **extra) -> dict:
    T, D, F_, E, K = shape
    return {
        "shape": f"{T},{D},{F_},{E},{K}", "T": T, "d": D, "n": F_, "E": E, "K": K,
        "dtype": dtype_name(dtype), "impl": impl, "flops": flops,
        "ms": meas["ms"], "ms_all": meas["ms_all"], "gflops": flops / (meas["ms"] / 1e3) / 1e9, "frac_of_dense": None,
        "saved_bytes": meas["saved_bytes"], "saved_mib": meas["saved_bytes"] / MiB,
        "speedup_vs_hf": None, "saved_ratio_hf_over_moekit": None, **extra,
    }


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def run(shapes=DEFAULT_SHAPES, dtypes=DEFAULT_DTYPES, warmup: int = 1, iters: int = 3, with_hf: bool = True,
        seed: int = 0, progress: bool = True, layout: str = "auto") -> List[dict]:
    """One dict per (shape, dtype, implementation); progress lines go to stderr when `progress`."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    dtypes = [resolve_dtype(d) for d in dtypes]
    hf_note = None if with_hf else "HF rows skipped (--no-hf)"
    reason = hf_unavailable_reason() if with_hf else None
    if reason is not None:
        hf_note, with_hf = f"HF rows skipped: {reason}", False
        _log(hf_note, progress)
    threads = torch.get_num_threads()
    gemm_peak = {}
    for dtype in dtypes:
        gemm_peak[dtype] = square_gemm_gflops(dtype)
        _log(f"square GEMM 2048^3 {dtype_name(dtype)}: {gemm_peak[dtype]:.1f} GFLOP/s ({threads} threads)", progress)

    rows: List[dict] = []
    for shape in shapes:
        T, D, F_, E, K = (int(v) for v in shape)
        shape = (T, D, F_, E, K)
        flops = moe_flops(T, D, F_, K)
        torch.manual_seed(seed)
        moe_f32 = MoE(MoEConfig(d_model=D, d_expert=F_, num_experts=E, top_k=K, router="softmax_topk",
                                norm_topk_prob=True, experts_impl="grouped", grouped_layout=layout))
        dense_f32 = DenseSwiGLU(D, F_)
        hf_f32, hf_impl = build_hf_from_moekit(moe_f32) if with_hf else (None, None)
        x32_TD, dy32_TD = torch.randn(T, D), torch.randn(T, D)
        x32_MD, dy32_MD = torch.randn(T * K, D), torch.randn(T * K, D)

        for dtype in dtypes:
            common = {"threads": threads, "square_gemm_gflops": gemm_peak[dtype], "hf_note": hf_note}
            elem = torch.empty((), dtype=dtype).element_size()
            x_bytes, h_bytes = T * D * elem, T * K * 2 * F_ * elem
            tag = f"[{shape} {dtype_name(dtype)}]"

            dense = copy.deepcopy(dense_f32).to(dtype)
            x_MD = x32_MD.to(dtype).requires_grad_(True)
            _log(f"{tag} {IMPL_DENSE} ...", progress)
            m = _measure(dense, x_MD, dy32_MD.to(dtype), list(dense.parameters()), warmup, iters)
            dense_row = _row(shape, dtype, IMPL_DENSE, flops, m, x_bytes=T * K * D * elem, h_bytes=h_bytes, **common)
            del dense, x_MD

            moe = copy.deepcopy(moe_f32).to(dtype)
            x_TD = x32_TD.to(dtype).requires_grad_(True)
            dy_TD = dy32_TD.to(dtype)
            hf_row = None
            if with_hf:
                hf = copy.deepcopy(hf_f32).to(dtype)
                with torch.no_grad():
                    y_mk = moe(x_TD)[0]
                    y_hf = hf(x_TD.view(1, T, D)).view(T, D)
                    diff = (y_hf.float() - y_mk.float()).abs().max().item()
                    scale = y_mk.float().abs().max().item()
                del y_mk, y_hf
                _log(f"{tag} HF vs moekit: max |dy| = {diff:.3g} (output max |y| = {scale:.3g}); "
                     f"HF experts impl: {hf_impl}", progress)
                tol = _AGREE_TOL.get(dtype, 5e-2)
                if not diff <= tol * scale:
                    raise AssertionError(f"{tag} HF and moekit outputs disagree: max abs diff {diff:.3g} > "
                                         f"{tol:g} * {scale:.3g}")
                x_1TD = x32_TD.to(dtype).view(1, T, D).requires_grad_(True)
                _log(f"{tag} {IMPL_HF} ...", progress)
                m = _measure(hf, x_1TD, dy_TD.view(1, T, D), list(hf.parameters()), warmup, iters)
                hf_row = _row(shape, dtype, IMPL_HF, flops, m, x_bytes=x_bytes, h_bytes=h_bytes,
                              hf_experts_impl=hf_impl, max_abs_diff_vs_moekit=diff, output_scale=scale, **common)
                del hf, x_1TD

            _log(f"{tag} {IMPL_MOEKIT} ...", progress)
            m = _measure(lambda x, layer=moe: layer(x)[0], x_TD, dy_TD, list(moe.parameters()), warmup, iters)
            moe_row = _row(shape, dtype, IMPL_MOEKIT, flops, m, x_bytes=x_bytes, h_bytes=h_bytes, **common)
            del moe, x_TD

            new = [r for r in (moe_row, dense_row, hf_row) if r is not None]
            for row in new:
                row["frac_of_dense"] = row["gflops"] / dense_row["gflops"]
            if hf_row is not None:
                moe_row["speedup_vs_hf"] = hf_row["ms"] / moe_row["ms"]
                moe_row["saved_ratio_hf_over_moekit"] = hf_row["saved_bytes"] / moe_row["saved_bytes"]
            rows += new
            _log(f"{tag} done: moekit {moe_row['ms']:.1f} ms, dense {dense_row['ms']:.1f} ms"
                 + (f", hf {hf_row['ms']:.1f} ms" if hf_row else ""), progress)
    return rows


# --------------------------------------------------------------------------- output
_COLUMNS = [  # (header, row key, format)
    ("shape (T,d,n,E,K)", "shape", "{}"), ("dtype", "dtype", "{}"), ("impl", "impl", "{}"),
    ("ms fwd+bwd", "ms", "{:.1f}"), ("GFLOP/s", "gflops", "{:.1f}"), ("frac of dense", "frac_of_dense", "{:.2f}"),
    ("saved MiB", "saved_mib", "{:.1f}"), ("speedup vs HF", "speedup_vs_hf", "{:.2f}x"),
    ("saved HF/moekit", "saved_ratio_hf_over_moekit", "{:.2f}x"),
]


def format_table(rows: List[dict]) -> str:
    """Header (threads, square-GEMM rate per dtype), one line per row, then notes."""
    if not rows:
        return "(no rows)"
    peaks = {r["dtype"]: r["square_gemm_gflops"] for r in rows}  # one figure per dtype
    lines = [f"MoE layer forward+backward on CPU, {rows[0]['threads']} threads; "
             f"GFLOP/s from 18*T*K*d*n (expert GEMMs only)",
             "square GEMM 2048^3 forward: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())]
    cells = [[h for h, _, _ in _COLUMNS]]
    cells += [["" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in _COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    cells.insert(1, ["-" * w for w in widths])
    for line in cells:  # the first three columns left-aligned, the numbers right-aligned
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    notes = [f"{r['shape']} {r['dtype']}: HF experts impl {r['hf_experts_impl']}; max |y_hf - y_moekit| = "
             f"{r['max_abs_diff_vs_moekit']:.3g} (max |y| = {r['output_scale']:.3g})"
             for r in rows if r["impl"] == IMPL_HF]
    notes += [rows[0]["hf_note"]] if rows[0].get("hf_note") else []
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def parse_shapes(text: str) -> List[Tuple[int, int, int, int, int]]:
    shapes = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        values = [v.strip() for v in part.split(",")]
        if len(values) != 5 or not all(v.isdigit() and int(v) > 0 for v in values):
            raise ValueError(f"a shape is five positive integers T,d,n,E,K; got {part!r}")
        T, D, F_, E, K = (int(v) for v in values)
        if K > E:
            raise ValueError(f"shape {part!r}: top_k K={K} exceeds num_experts E={E}")
        shapes.append((T, D, F_, E, K))
    if not shapes:
        raise ValueError(f"no shapes in {text!r}")
    return shapes


def main(argv=None) -> int:
    """Command-line entry; returns the exit status 0 (rows are printed, not returned)."""
    p = cliargs.parser("moekit bench moe-layer", "Forward+backward of the moekit MoE layer vs a dense FFN of equal "
                       "FLOPs and HF Qwen3-MoE (CPU).")
    p.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in DEFAULT_SHAPES),
                   help='semicolon-separated T,d,n,E,K tuples, e.g. "4096,512,128,64,8;1024,256,64,32,4"')
    p.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES),
                   help="comma-separated dtypes, e.g. fp32,bf16 (" + cliargs.DTYPE_HELP + ")")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="warmup iterations (the saved-bytes pass is the first)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers Qwen3MoeSparseMoeBlock rows")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.add_argument("--layout", default="auto", choices=["auto", "compact", "padded"],
                   help="grouped backend row layout (MoEConfig.grouped_layout)")
    p.add_argument("--no-malloc-tune", action="store_true",  # also understood (and stripped) by `moekit bench`
                   help="leave glibc malloc as it is (by default freed large blocks are kept for reuse, "
                   "for every row alike; see moekit.runtime)")
    args = p.parse_args(argv)
    tuned = False if args.no_malloc_tune else tune_cpu_allocator()
    if not args.json:
        print(f"allocator tuning (moekit.runtime.tune_cpu_allocator): {'on' if tuned else 'off'}")
    try:
        shapes = parse_shapes(args.shapes)
        dtypes = [resolve_dtype(cliargs.dtype_name(d)) for d in args.dtypes.split(",") if d.strip()]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    rows = run(shapes, dtypes, warmup=args.warmup, iters=args.iters, with_hf=not args.no_hf, layout=args.layout)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    main()
