"""`moekit profile MODEL`: where a training or decode step's time goes, next to the analyzer's FLOPs share.

    moekit profile small --mode train --steps 3 --trace trace.json
    moekit profile runs/demo --mode decode --steps 16

How time is attributed (CPU time; on CUDA the profiler's device time of the same events):
- forward: hooks wrap each component's module (`component_modules`; attention includes its
  q/k norms, shared_experts Qwen2-MoE's gate, head the loss) in a `moekit::<component>`
  record_function range, also seen in the Chrome trace; its time is the sum of its ranges.
- backward: each `autograd::engine::evaluate_function` event carries the sequence number of
  the forward op that created it, whose enclosing `moekit::` range names the component.
- other: the measured step time minus everything attributed (routing glue, residual adds,
  optimizer step, Python overhead).
Predicted: `moekit.analyze` FLOPs per token by component at the profiled context
(training = 3 x forward), as a share of the total. Norms and embedding have 0 matmul FLOPs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from . import cliargs

COMPONENTS = ("embedding", "attention", "norms", "dense_ffn", "router", "experts", "shared_experts", "head", "other")
RANGE = "moekit::"


def component_modules(model) -> List[tuple]:
    """(module, component) pairs covering a moekit Transformer, outermost first."""
    pairs = [(model.embed, "embedding"), (model.norm, "norms"), (model.lm_head, "head")]
    for block in model.layers:
        pairs += [(block.attn_norm, "norms"), (block.attn, "attention"), (block.ffn_norm, "norms")]
        if block.is_moe:
            moe = block.ffn
            pairs += [(moe.router, "router"), (moe.experts, "experts")]
            pairs += [(m, "shared_experts") for m in (moe.shared, moe.shared_gate) if m is not None]
        else:
            pairs.append((block.ffn, "dense_ffn"))
    return pairs


def _add_ranges(pairs) -> list:
    """Forward hooks that wrap each (module, component) in a profiler range; returns their handles."""
    enter, exit_ = torch.ops.profiler._record_function_enter_new, torch.ops.profiler._record_function_exit
    opened, handles = [], []  # the open ranges, innermost last
    for module, comp in pairs:
        handles.append(module.register_forward_pre_hook(
            lambda m, a, name=RANGE + comp: opened.append(enter(name, None))))
        handles.append(module.register_forward_hook(lambda m, a, out: exit_._RecordFunction(opened.pop())))
    return handles


def _component_of(e) -> Optional[str]:
    while e is not None:  # the innermost enclosing moekit:: range
        if e.name.startswith(RANGE):
            return e.name[len(RANGE):]
        e = e.cpu_parent
    return None


def attribute(events, cuda: bool) -> Dict[str, float]:
    """Seconds per component from profiler events (see the module docstring)."""
    t = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    out: Dict[str, float] = defaultdict(float)
    seq_comp: Dict[int, str] = {}
    for e in events:
        if e.name.startswith(RANGE):
            parent = e.cpu_parent
            nested = parent is not None and _component_of(parent) is not None
            if not nested:
                out[e.name[len(RANGE):]] += t(e) / 1e6
        elif e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            comp = _component_of(e)
            if comp is not None:
                seq_comp[e.sequence_nr] = comp
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr >= 0:
            comp = seq_comp.get(e.sequence_nr)
            if comp is not None:
                out[comp] += t(e) / 1e6
    return dict(out)


def _train_step(model, opt, tokens_BT):
    logits_BTV = model(tokens_BT[:, :-1])
    with torch.profiler.record_function(RANGE + "head"):
        loss = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1).float(), tokens_BT[:, 1:].flatten())
    (loss + model.moe_aux().loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_profile(model, mode: str = "train", steps: int = 3, batch: int = 4, seq: int = 128, trace: Optional[str] = None,
                seed: int = 0) -> Dict:
    from .analyze import from_model_config
    from .analyze.estimate import flops_by_component

    if mode not in ("train", "decode"):
        raise ValueError(f"--mode must be 'train' or 'decode', got {mode!r}")
    for name, v in (("--steps", steps), ("--batch", batch), ("--seq", seq)):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if seq + (steps if mode == "decode" else 1) > model.cfg.max_seq_len:
        raise ValueError(f"--seq {seq} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    tokens_BT = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _train_step(model, opt, tokens_BT)  # warm-up, not profiled
        step = lambda i: _train_step(model, opt, tokens_BT)  # noqa: E731
        ctx = seq
        tokens_per_step = batch * seq
    else:
        model.eval()
        cache = model.new_cache(batch, seq + steps + 1, next(model.parameters()).dtype, device)
        with torch.no_grad():
            model(tokens_BT[:, :seq], cache=cache, start=0)

        def step(i):
            with torch.no_grad():
                model(tokens_BT[:, seq:seq + 1], cache=cache, start=seq + i)
        ctx = seq + steps // 2
        tokens_per_step = batch
    hooks = _add_ranges(component_modules(model))
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    try:
        with torch.profiler.profile(activities=activities) as prof:
            sync()
            t0 = time.perf_counter()
            for i in range(steps):
                step(i)
            sync()
            wall = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    if trace:
        prof.export_chrome_trace(trace)
    measured = attribute(prof.events(), cuda)
    measured["other"] = max(0.0, wall - sum(measured.values()))
    factor = 3 if mode == "train" else 1  # training = 3 x forward
    flops = {c: factor * v for c, v in flops_by_component(from_model_config(model.cfg), ctx).items()}
    total_flops = sum(flops.values())
    rows = []
    for c in COMPONENTS:
        s = measured.get(c, 0.0)
        f = flops.get(c, 0.0) * tokens_per_step * steps
        rows.append({"component": c, "seconds": s, "time_share": s / wall, "flops_share": f / (total_flops * tokens_per_step * steps),
                     "gflops_per_s": f / s / 1e9 if s > 0 and f > 0 else None})
    return {"mode": mode, "steps": steps, "batch": batch, "seq": seq, "wall_s": wall, "device": str(device),
            "tokens_per_s": tokens_per_step * steps / wall, "components": rows, "trace": trace}


def render(r: Dict) -> str:
    lines = [f"{r['mode']}: {r['steps']} steps, batch {r['batch']}, seq {r['seq']} on {r['device']}: "
             f"{r['wall_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} tok/s", "",
             "| component | ms | time share | FLOPs share | GFLOP/s |", "|---|---:|---:|---:|---:|"]
    for row in r["components"]:
        gf = f"{row['gflops_per_s']:.1f}" if row["gflops_per_s"] else "-"
        lines.append(f"| {row['component']} | {row['seconds'] * 1e3:.1f} | {row['time_share']:.1%} | {row['flops_share']:.1%} | {gf} |")
    if r["trace"]:
        lines += ["", f"Chrome trace: {r['trace']} (open in chrome://tracing or https://ui.perfetto.dev)"]
    return "\n".join(lines)


def _load(model_arg: str, device: str):
    from pathlib import Path

    from .config import ModelConfig
    from .model import Transformer
    from .presets import MODEL_PRESETS

    if model_arg in MODEL_PRESETS:
        cfg = ModelConfig.preset(model_arg)
        with torch.device("meta"):
            n = Transformer(cfg).num_params()
        if n > 2e9:
            raise ValueError(f"preset {model_arg!r} has {n / 1e9:.1f}B parameters: too large to profile here; "
                             f"use `moekit analyze {model_arg}` for its arithmetic")
        torch.manual_seed(0)
        return Transformer(cfg).to(device)
    if Path(model_arg).is_dir():
        from .loading import load_model

        return load_model(model_arg, device=device)
    raise ValueError(f"unknown model {model_arg!r}: give a preset ({', '.join(sorted(MODEL_PRESETS))}) "
                     f"or a checkpoint/run directory")


def build_parser() -> argparse.ArgumentParser:
    p = cliargs.parser("moekit profile", "Run a few training or decode steps under torch.profiler; print each "
                       "component's time share next to the analyzer's FLOPs share and write a Chrome trace.",
                       "examples:\n  moekit profile small --mode train --steps 3\n"
                       "  moekit profile runs/demo --mode decode --steps 16 --trace ''")
    cliargs.add_model_argument(p, "preset name or checkpoint/run directory")
    p.add_argument("--mode", default="train", choices=("train", "decode"),
                   help="profile training steps (forward, backward, AdamW) or decode steps (one token each)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after one unprofiled warm-up)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="sequence length (train) or prompt length (decode)")
    p.add_argument("--trace", default="moekit_trace.json", help="Chrome trace output ('' to skip)")
    p.add_argument("--device", type=cliargs.device_name, default="auto", help=cliargs.DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return p


def cli(argv: Optional[List[str]] = None) -> int:
    """`moekit profile` (errors: `moekit.cli`)."""
    p = build_parser()
    args = p.parse_args(argv)
    model = _load(cliargs.model_path(args, p), cliargs.check_device(args.device))
    r = run_profile(model, args.mode, args.steps, args.batch, args.seq, args.trace or None)
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0
