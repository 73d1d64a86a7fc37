"""Training-step throughput on CPU: moekit vs HF transformers `Qwen3MoeForCausalLM`, same weights.

Question: how many training tokens/s does moekit process on a small MoE model, against the
HF transformers implementation of the same architecture, weights, batch and optimizer?

Model: `bench_config()` of benchmarks/decode.py, i.e. the `small` preset's size (vocab 4096,
d_model 256, 4 layers, 8 heads / 4 KV heads, qk-norm per head, 16 experts of d_expert 128,
top-4) with a Qwen3-MoE router (softmax_topk, norm_topk_prob, no shared expert, no dense
first layer) so HF can represent it. moekit builds it from --seed, exports it with
`moekit.hf.save_hf(model, dir, model_type="qwen3_moe")`, and HF loads that directory with
`AutoModelForCausalLM.from_pretrained(dir, dtype=float32, experts_implementation="eager")`.
(Unlike decode.py the lm_head is NOT scaled: the losses stay ordinary.)

One training step, identical for both (float32, model.train(), torch's default CPU threads):
    logits = model(x)                        # HF: model(input_ids=x, use_cache=False).logits
    loss = cross_entropy(logits, y) + aux    # aux: see below
    loss.backward()
    clip_grad_norm_(all parameters, 1.0)
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    moekit only: moekit.moe.update_expert_biases(model)   (as src/moekit/train.py does)
Optimizer, both: one plain `torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95),
weight_decay=0.1)` over ALL parameters (weight decay on every tensor, norms included; this is
not moekit's `build_optimizer` grouping, which exempts 1-D tensors, so the optimizer work is
exactly the same for both). Batch: B x (T+1) random token ids from torch.Generator(seed),
x = ids[:, :-1], y = ids[:, 1:]; the same batch every step.

Aux loss: off in both by default (bench_config has aux_loss_coef=0, exported as HF
router_aux_loss_coef=0; HF runs with output_router_logits=False so it skips its router-logit
bookkeeping too). That is the fairest setting: moekit's Switch loss (summed per layer) and
HF's load_balancing_loss_func (one loss over all layers' router probs concatenated) are not
the same formula, so with aux on the total losses would differ. `--aux-coef C` turns it on in
both (moekit aux_loss_coef=C; HF output_router_logits=True, router_aux_loss_coef=C, loss =
CE + C * outputs.aux_loss); the initial-loss check then compares the CE part only.

moekit runs its default expert backend (experts_impl="grouped", grouped_layout="auto"); HF
runs its eager per-expert loop (experts_implementation="eager") and its default attention
(sdpa); both are printed.

Timing: --warmup steps, then --steps timed full steps (forward + backward + clip + optimizer
step [+ bias update]); the median step time is reported; tokens/s = B*T / median.
Memory: each implementation runs in its own subprocess (`--impl moekit|hf --json`), so they
do not share a heap. "peak RSS" = resource.getrusage(RUSAGE_SELF).ru_maxrss at the end;
"base RSS" = the process's current RSS (VmRSS) right after building model + optimizer;
"train increment" = peak - base (activations, gradients, AdamW state, allocator slack). The
HF process first builds the moekit model to export the weights and frees it before base RSS
is read. Both call `moekit.runtime.tune_cpu_allocator()` (glibc keeps freed large blocks for
reuse instead of mmap/munmap per allocation; it raises retained RSS and speeds up both);
`--no-malloc-tune` skips it in both.

    python benchmarks/train_step.py                      # both, table (two subprocesses)
    python benchmarks/train_step.py --json               # one JSON object per implementation
    python benchmarks/train_step.py --impl moekit --json # one implementation in this process
    python benchmarks/train_step.py --impl moekit --profile   # torch.profiler top ops of moekit's step
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import bench_config  # noqa: E402  (benchmarks/decode.py)
from machine import print_machine_header

LR, BETAS, WD, CLIP = 3e-3, (0.9, 0.95), 0.1, 1.0


def _current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _config(aux_coef: float):
    import dataclasses

    cfg = bench_config()
    return cfg.replace(moe=dataclasses.replace(cfg.moe, aux_loss_coef=aux_coef)) if aux_coef else cfg


def _batch(vocab: int, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def build(impl: str, seed: int, aux_coef: float):
    """(model, step_loss_fn, after_step_fn, info) for one implementation."""
    from moekit import Transformer

    torch.manual_seed(seed)
    mk = Transformer(_config(aux_coef))
    vocab = mk.cfg.vocab_size
    if impl == "moekit":
        from moekit.moe import update_expert_biases

        mk.train()

        def loss_fn(x, y):
            logits = mk(x)
            ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
            return ce, mk.moe_aux().loss

        moe = mk.cfg.moe
        info = dict(backend=f"experts_impl={moe.experts_impl}, grouped_layout={moe.grouped_layout}",
                    params=sum(p.numel() for p in mk.parameters()))
        return mk, loss_fn, (lambda: update_expert_biases(mk)), info, vocab

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moekit.hf import save_hf

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmpdir:
        save_hf(mk, tmpdir, model_type="qwen3_moe")
        del mk
        gc.collect()
        hf = AutoModelForCausalLM.from_pretrained(tmpdir, dtype=torch.float32, experts_implementation="eager")
    hf.train()
    use_aux = bool(aux_coef)
    hf.config.router_aux_loss_coef = aux_coef

    def loss_fn(x, y):
        out = hf(input_ids=x, use_cache=False, output_router_logits=use_aux)
        logits = out.logits
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        aux = aux_coef * out.aux_loss if use_aux else torch.zeros(())
        return ce, aux

    cfg = hf.config
    experts = getattr(cfg, "_experts_implementation", None)
    info = dict(backend=f"{type(hf).__name__}, experts_implementation={experts}, "
                        f"attn_implementation={cfg._attn_implementation}, output_router_logits={use_aux}",
                params=sum(p.numel() for p in hf.parameters()))
    return hf, loss_fn, (lambda: None), info, vocab


def run_impl(impl: str, batch: int, seq: int, warmup: int, steps: int, seed: int, aux_coef: float,
             profile: bool = False) -> dict:
    model, loss_fn, after_step, info, vocab = build(impl, seed, aux_coef)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    x, y = _batch(vocab, batch, seq, seed)
    gc.collect()
    base_rss, peak_at_build = _current_rss_mib(), _peak_rss_mib()

    with torch.no_grad():  # the initial loss on the batch (same weights in both processes)
        ce0, aux0 = loss_fn(x, y)
    init_ce, init_aux = ce0.item(), float(aux0)

    def step():
        ce, aux = loss_fn(x, y)
        (ce + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_step()
        return ce

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ce = step()
        ce.item()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = dict(impl=impl, backend=info["backend"], params=info["params"], batch=batch, seq=seq,
               tokens_per_step=batch * seq, warmup=warmup, steps=steps, threads=torch.get_num_threads(),
               ms_per_step=1e3 * med, tokens_per_s=batch * seq / med,
               ms_min=1e3 * min(times), ms_max=1e3 * max(times),
               init_ce=init_ce, init_aux=init_aux, init_loss=init_ce + init_aux, final_ce=ce.item(),
               base_rss_mib=base_rss, peak_rss_at_build_mib=peak_at_build, peak_rss_mib=_peak_rss_mib())
    row["train_increment_mib"] = row["peak_rss_mib"] - base_rss
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile, record_function

        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(2):
                with record_function(f"{impl}_train_step"):
                    step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    return row


def format_table(rows) -> str:
    hf = next((r for r in rows if r["impl"] == "hf"), None)
    head = ("impl", "tokens/s", "ms/step (min-max)", "speed-up vs HF", "peak RSS MiB", "train increment MiB",
            "initial loss")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        name = "HF transformers (eager experts)" if r["impl"] == "hf" else "moekit (grouped)"
        sp = f"{hf['ms_per_step'] / r['ms_per_step']:.2f}x" if hf else "-"
        lines.append(" | ".join([
            name, f"{r['tokens_per_s']:.0f}", f"{r['ms_per_step']:.0f} ({r['ms_min']:.0f}-{r['ms_max']:.0f})", sp,
            f"{r['peak_rss_mib']:.0f}", f"{r['train_increment_mib']:.0f}", f"{r['init_loss']:.6f}"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=["both", "moekit", "hf"], default="both",
                   help="both (default): one subprocess per implementation; moekit / hf: run here")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aux-coef", type=float, default=0.0,
                   help="load-balancing aux loss coefficient for both (default 0: off in both)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object per implementation")
    p.add_argument("--no-malloc-tune", action="store_true", help="skip moekit.runtime.tune_cpu_allocator()")
    p.add_argument("--profile", action="store_true",
                   help="with --impl moekit|hf: also profile 2 steps, top ops by self CPU time to stderr")
    args = p.parse_args(argv)

    if args.impl != "both":
        if not args.no_malloc_tune:
            from moekit.runtime import tune_cpu_allocator

            tune_cpu_allocator()
        if args.threads:
            torch.set_num_threads(args.threads)
        row = run_impl(args.impl, args.batch, args.seq, args.warmup, args.steps, args.seed, args.aux_coef,
                       profile=args.profile)
        row["malloc_tune"] = not args.no_malloc_tune
        if args.json:
            print(json.dumps(row))
        else:
            print(format_table([row]))
        return 0

    try:
        import transformers
    except ImportError:
        print("benchmarks/train_step.py needs transformers (pip install 'moekit[hf]')", file=sys.stderr)
        return 2
    passthrough = ["--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--seed", str(args.seed), "--aux-coef", str(args.aux_coef)]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    if args.no_malloc_tune:
        passthrough.append("--no-malloc-tune")
    rows = []
    for impl in ("hf", "moekit"):
        if not args.json:
            print(f"  running {impl} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--impl", impl, "--json", *passthrough],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    hf, mk = rows
    speedup = hf["ms_per_step"] / mk["ms_per_step"]
    for r in rows:
        r["speedup_vs_hf"] = hf["ms_per_step"] / r["ms_per_step"]
    ce_diff = abs(hf["init_ce"] - mk["init_ce"])
    if args.json:
        for r in rows:
            print(json.dumps({**r, "init_ce_abs_diff": ce_diff, "torch": torch.__version__,
                              "transformers": transformers.__version__}))
    else:
        print(f"training step throughput, CPU float32, {mk['threads']} threads, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, malloc tune {'off' if args.no_malloc_tune else 'on'}")
        print(f"model: small-qwen3moe ({mk['params'] / 1e6:.2f}M params moekit, {hf['params'] / 1e6:.2f}M HF), "
              f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq} tokens/step, aux coef {args.aux_coef}")
        print(f"optimizer (both): torch.optim.AdamW over all parameters, lr {LR}, betas {BETAS}, wd {WD}; "
              f"clip {CLIP}")
        print(f"moekit: {mk['backend']}")
        print(f"HF:     {hf['backend']}")
        print(f"median of {args.steps} full steps after {args.warmup} warm-up steps\n")
        print(format_table(rows))
        print(f"\ninitial CE on the same batch: moekit {mk['init_ce']:.6f}  HF {hf['init_ce']:.6f}  "
              f"|diff| {ce_diff:.2e}")
        print(f"speed-up {speedup:.2f}x  (target >= 2x: {'met' if speedup >= 2 else 'NOT met'})")
    if ce_diff > 1e-4:
        print(f"initial losses differ by {ce_diff:.2e} (> 1e-4)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
