"""What each low-precision recipe costs in loss (issue 16's study), emulated on the CPU.

The same model (the tiny preset, MoE with a shared expert), data (a byte-level corpus: this repo's Python
sources, tokenised as bytes), seeds and steps under: fp32 (the baseline), fp8-blockwise, mxfp8, and
mxfp4-bwd with round-to-nearest, SR only, RHT only and SR+RHT. Reports the final validation loss, its
relative gap to the baseline (mean and spread over seeds) and the wall-clock cost of the emulation;
writes a markdown table and a loss-curve PNG.

    python benchmarks/low_precision.py --steps 150 --seeds 0 1 --out benchmarks/results/low_precision_cpu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit import ModelConfig, Transformer
from moekit.lowp.transform import apply_precision
from moekit.presets import MODEL_PRESETS

RUNS = [("fp32", "none"), ("fp8-blockwise", "fp8-blockwise"), ("mxfp8", "mxfp8"),
        ("mxfp4-bwd RTN", "mxfp4-bwd:sr=0,rht=0"), ("mxfp4-bwd SR", "mxfp4-bwd:sr=1,rht=0"),
        ("mxfp4-bwd RHT", "mxfp4-bwd:sr=0,rht=1"), ("mxfp4-bwd SR+RHT", "mxfp4-bwd:sr=1,rht=1")]
VOCAB = 256


def corpus_bytes(limit: int) -> torch.Tensor:
    root = Path(__file__).resolve().parents[1] / "src" / "moekit"
    data = b"".join(p.read_bytes() for p in sorted(root.rglob("*.py")))[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batches(tokens: torch.Tensor, seq: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq - 1, (steps, batch), generator=g)
    for row in starts:
        yield torch.stack([tokens[s:s + seq + 1] for s in row.tolist()])


def run(spec: str, seed: int, args, train_tokens, val_tokens):
    torch.manual_seed(seed)
    cfg = {**MODEL_PRESETS["tiny"], "vocab_size": VOCAB, "max_seq_len": args.seq, "dtype": "float32",
           "d_model": args.d_model}
    cfg["moe"] = {**cfg["moe"], "d_model": args.d_model, "num_shared_experts": 1}
    model = apply_precision(Transformer(ModelConfig(**cfg)), spec)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    val = list(batches(val_tokens, args.seq, args.batch, args.val_batches, 1234))
    curve, start = [], time.perf_counter()
    for step, tok in enumerate(batches(train_tokens, args.seq, args.batch, args.steps, seed)):
        lr = args.lr * min(1.0, (step + 1) / 10)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(tok[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        val_loss = statistics.mean(
            F.cross_entropy(model(t[:, :-1]).reshape(-1, VOCAB).float(), t[:, 1:].reshape(-1)).item() for t in val)
    return curve, val_loss, seconds


def smooth(values, k=10):
    return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/low_precision_cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokens = corpus_bytes(2_000_000)
    split = int(0.9 * tokens.numel())
    train_tokens, val_tokens = tokens[:split], tokens[split:]

    results = {}
    for name, spec in RUNS:
        for seed in args.seeds:
            curve, val_loss, seconds = run(spec, seed, args, train_tokens, val_tokens)
            results[(name, seed)] = (curve, val_loss, seconds)
            print(f"{name:18s} seed {seed}: val loss {val_loss:.4f}  {seconds:.1f}s", flush=True)

    base = {s: results[("fp32", s)][1] for s in args.seeds}
    base_time = statistics.mean(results[("fp32", s)][2] for s in args.seeds)
    rows = []
    for name, spec in RUNS:
        vals = [results[(name, s)][1] for s in args.seeds]
        gaps = [100 * (results[(name, s)][1] - base[s]) / base[s] for s in args.seeds]
        secs = statistics.mean(results[(name, s)][2] for s in args.seeds)
        rows.append(f"| {name} | `{spec}` | {statistics.mean(vals):.4f} | {min(vals):.4f} .. {max(vals):.4f} | "
                    f"{statistics.mean(gaps):+.2f}% | {min(gaps):+.2f} .. {max(gaps):+.2f}% | {secs:.1f} | "
                    f"{secs / base_time:.1f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(results, args, out.with_suffix(".png"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    has = ", ".join(f"{f} {'yes' if f' {f} ' in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16"))
    text = [
        "# Low-precision training study (CPU emulation)", "",
        f"Command: `python benchmarks/low_precision.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
        f"--seq {args.seq} --batch {args.batch} --d-model {args.d_model} --lr {args.lr} --threads {args.threads}`",
        f"Commit: `{commit}` (plus the uncommitted lowp tree of this session).",
        f"Machine: {cpu} ({has}); torch {torch.__version__}, {args.threads} thread(s), shared with other jobs.", "",
        f"Model: tiny preset at d_model {args.d_model} (2 blocks: dense + MoE with 8 experts, top-2, one shared "
        f"expert), byte vocabulary; data: moekit's own sources as bytes (90/10 split); AdamW lr {args.lr}, 10 warmup "
        f"steps, {args.steps} steps of {args.batch} x {args.seq} tokens; the same seeds and batches for every "
        f"recipe. Validation: {args.val_batches} fixed batches from the held-out 10%.", "",
        "| run | precision | val loss (mean) | seed range | gap to fp32 (mean) | gap range | train s | cost |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "gap: (val loss - fp32 val loss of the same seed) / fp32; cost: wall clock relative to fp32 (the emulation's "
        "quantise/dequantise overhead, not a real low-precision speed).", "",
        f"![loss curves]({plot.name})" if plot else "(matplotlib not installed: no plot)", ""]
    out.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))


def plot_curves(results, args, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, _ in RUNS:
        curves = [results[(name, s)][0] for s in args.seeds]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0]))]
        ax.plot(smooth(mean), label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (mean of {len(args.seeds)} seeds, 10-step moving average)")
    ax.set_title("tiny MoE, CPU emulation of low-precision GEMMs")
    ax.legend()
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
