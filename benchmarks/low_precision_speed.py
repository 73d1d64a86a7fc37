"""Speed of the FP8 recipes' two executions (moekit.lowp: `gemm=emulate` vs `gemm=scaled_mm`) against the
plain GEMM of the compute dtype, in one run.

Question: what does a recipe's GEMM cost when emulated (quantise, dequantise, float32 matmul) and when its
FP8 codes and scales go into torch._scaled_mm, against torch.mm in float32 (CPU) or bf16 (CUDA)?

Per GEMM shape M x K x N (y = x Wᵀ, x: (M, K), W: (N, K); 2MNK flops) and per FP8 recipe:
    baseline        torch.mm of x and Wᵀ in the compute dtype (fp32 on CPU, bf16 on CUDA)
    emulate         Recipe.product("fwd", x, W) with gemm=emulate: quantise + dequantise + fp32 matmul
    scaled_mm       Recipe.product("fwd", x, W) with gemm=scaled_mm: quantise + torch._scaled_mm
    scaled_mm GEMM  torch._scaled_mm alone, on codes and scales quantised beforehand (the kernel's share)
A recipe torch cannot run as a scaled matmul on this device (fp8-blockwise off sm90) shows the reason.
Then a training step of a small model (forward, backward, AdamW) under none, each recipe emulated and
each as scaled_mm: ms/step and tokens/s. The routed experts run through moe/gmm.py (emulated there
until ExpertRows calls Recipe.grouped_product; the table says which).

Timing: `--warmup` calls each, then `--repeats` rounds in which every variant of a shape (or every
training-step model) runs `--iters` calls between two device syncs in turn, interleaved so that load
from other processes hits all alike; the median round's mean call time. Inputs: randn (seed 0), x with one outlier.

    python benchmarks/low_precision_speed.py                    # this machine's device, default shapes
    python benchmarks/low_precision_speed.py --device cuda --out benchmarks/results/low_precision_speed_gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from common import git_commit
from machine import machine_header
from moekit import ModelConfig, Transformer
from moekit.lowp.recipes import get_recipe
from moekit.lowp.scaled import fp8_quantize, fp8_scaled_mm
from moekit.lowp.transform import apply_precision

RECIPES = ("fp8-tensorwise", "fp8-rowwise", "fp8-blockwise")
SHAPES = {"cpu": ["512x512x512", "1024x1024x1024", "1000x1000x1000"],
          "cuda": ["4096x4096x4096", "8192x8192x8192", "16384x2048x7168", "4000x4000x4000"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all(fns, device, warmup, iters, repeats):
    """Median ms per call of each fn: `repeats` rounds, each timing every fn over `iters` calls in turn
    (interleaved, so load from other processes hits all of them alike)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    loops = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, loops):
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            times.append((time.perf_counter() - start) / iters * 1e3)
    return [statistics.median(times) for times in loops]


def gemm_rows(shape: str, args, device, dtype):
    M, K, N = map(int, shape.split("x"))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g, dtype=torch.float32)
    x[0, 0] = 50.0
    x, w = x.to(dtype), torch.randn(N, K, device=device, generator=g).to(dtype)
    runs = [("-", f"baseline ({str(dtype).replace('torch.', '')} torch.mm)", lambda: x @ w.T)]
    skipped = []
    for name in args.recipes:
        emulated, scaled = get_recipe(f"{name}:gemm=emulate"), get_recipe(f"{name}:gemm=scaled_mm")
        runs.append((name, "emulate", lambda r=emulated: r.product("fwd", x, w)))
        if scaled.runs_as("fwd", device) != "scaled_mm":
            skipped.append((name, f"scaled_mm: emulated ({scaled.fallbacks['fwd']})"))
            continue
        ga = scaled.fwd
        qa, qb = fp8_quantize(x, ga.a.elem, ga.a.scaling), fp8_quantize(w, ga.b.elem, ga.b.scaling)
        runs.append((name, "scaled_mm (quantise + GEMM)", lambda r=scaled: r.product("fwd", x, w)))
        runs.append((name, "scaled_mm GEMM only",
                     lambda qa=qa, qb=qb, p=(ga.a.scaling, ga.b.scaling): fp8_scaled_mm(qa, qb, p, N, dtype)))
    times = time_all([fn for _, _, fn in runs], device, args.warmup, args.iters, args.repeats)
    flops = 2 * M * N * K
    rows = [(shape, name, how, ms, flops, times[0]) for (name, how, _), ms in zip(runs, times)]
    return rows + [(shape, name, how, None, flops, times[0]) for name, how in skipped]


def step_run(spec: str, args, device, dtype):
    """(one training step of a fresh model under spec, its recipe or None)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.step_preset)
    cfg = cfg.replace(dtype=str(dtype).replace("torch.", ""), max_seq_len=max(cfg.max_seq_len, args.step_seq))
    model = apply_precision(Transformer(cfg).to(device), spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tok = torch.randint(0, cfg.vocab_size, (args.step_batch, args.step_seq + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        logits = model(tok[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), tok[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, getattr(model.layers[0].attn.q_proj, "recipe", None)


def fallbacks(recipe) -> str:
    """'fwd, dgrad: reason' per distinct reason a GEMM of the recipe was emulated instead of scaled."""
    by_reason = {}
    for role, why in (recipe.fallbacks.items() if recipe else ()):
        by_reason.setdefault(why, []).append(role)
    return "; ".join(f"{', '.join(roles)}: {why}" for why, roles in by_reason.items()) or "-"


def render_gemms(rows) -> str:
    out = ["shape MxKxN | recipe | execution | ms | TFLOP/s | vs baseline",
           "----------- | ------ | --------- | -- | ------- | -----------"]
    for shape, name, how, ms, flops, base in rows:
        if ms is None:
            out.append(f"{shape} | {name} | {how} | - | - | -")
        else:
            out.append(f"{shape} | {name} | {how} | {ms:.3f} | {flops / ms / 1e9:.3f} | {base / ms:.2f}x")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--shapes", nargs="+", help="MxKxN GEMM shapes (default: per device, see SHAPES)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--step-preset", default="small", help="model preset of the training-step rows")
    p.add_argument("--step-batch", type=int, help="default 4 on CPU, 16 on CUDA")
    p.add_argument("--step-seq", type=int, help="default 128 on CPU, 512 on CUDA")
    p.add_argument("--step-warmup", type=int, default=1)
    p.add_argument("--step-steps", type=int, default=5)
    p.add_argument("--no-step", action="store_true", help="skip the training-step rows")
    p.add_argument("--out", help="also write the markdown here")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*GEMM emulated")  # the tables say which and why
    if args.threads:
        torch.set_num_threads(args.threads)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if name not in ("cpu", "cuda") or name == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: choose auto, cpu or cuda (cuda needs a GPU)")
    device = torch.device(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.step_batch = args.step_batch or (16 if device.type == "cuda" else 4)
    args.step_seq = args.step_seq or (512 if device.type == "cuda" else 128)

    lines = [f"# Low-precision GEMM speed: emulate vs scaled_mm ({device.type})", "",
             f"Date: {datetime.date.today()}, commit {git_commit()}.  ",
             machine_header().strip(), "",
             "    python benchmarks/low_precision_speed.py " + " ".join(sys.argv[1:]), ""]
    rows = []
    for shape in args.shapes or SHAPES[device.type]:
        rows += gemm_rows(shape, args, device, dtype)
    lines += ["## Forward GEMM y = x Wᵀ per shape", "", render_gemms(rows), ""]
    print("\n".join(lines), flush=True)
    if not args.no_step:
        step = ["## Training step", "",
                f"Preset `{args.step_preset}` in {str(dtype).replace('torch.', '')}, batch {args.step_batch} x seq "
                f"{args.step_seq}, forward + backward + AdamW; median of {args.step_steps} interleaved steps after "
                f"{args.step_warmup} warm-up.", "",
                "precision | ms/step | tokens/s | vs none | GEMMs emulated (fallbacks)",
                "--------- | ------- | -------- | ------- | --------------------------"]
        tokens = args.step_batch * args.step_seq
        specs = ["none"] + [f"{r}:gemm={e}" for r in args.recipes for e in ("emulate", "scaled_mm")]
        runs = [step_run(spec, args, device, dtype) for spec in specs]
        times = time_all([fn for fn, _ in runs], device, args.step_warmup, 1, args.step_steps)
        for spec, (_, recipe), ms in zip(specs, runs, times):
            step.append(f"{spec} | {ms:.1f} | {tokens / ms * 1e3:.0f} | {times[0] / ms:.2f}x | {fallbacks(recipe)}")
        lines += step + [""]
        print("\n".join(step))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
