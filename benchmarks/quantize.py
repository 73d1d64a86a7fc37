"""Weight-only quantization on CPU: perplexity, weight bytes and batch-1 decode speed per method.

Question: what does each `moekit.quantize` method cost in quality on a trained MoE model, how
much weight memory does it save, and how fast does it decode at batch 1 on a CPU?

Model: a trained checkpoint (default runs/default: the `small` preset after `moekit train`,
400 steps on the Python standard library). Quality: perplexity on the default corpus's
validation split (the same file split and tokenizer as training; `--batches` windows of
`--seq-len` tokens, the same windows for every method). Memory: bytes of all parameters and
persistent buffers (`moekit.quantize.model_bytes`) and the reduction against float32.
Speed: `generate` at batch 1, greedy, a `--prompt-len` prompt from the validation text,
`--new-tokens` tokens; decode tok/s = (new - 1) tokens / time after the first token (best of
`--repeats`), eager and with `compile=True` (`--no-compile` skips it; the first compiled call
per model compiles and is not timed). Greedy agreement: how many of the first new tokens
equal the float model's.

    python benchmarks/quantize.py                           # table
    python benchmarks/quantize.py --json                    # one JSON object per row
    python benchmarks/quantize.py --checkpoint runs/x --methods int8,q4_0 --batches 8
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import git_commit
from moekit import load_model
from moekit.data import cached_shards, default_corpus_files, split_files, TokenWindows
from moekit.generate import generate
from moekit.quantize import METHODS, model_bytes, quantize_model, size_report
from machine import print_machine_header


def perplexity(model, windows: TokenWindows, batches: int) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for x_BT, y_BT in windows.iter_eval(batches):
            logits = model(x_BT).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y_BT.reshape(-1), reduction="sum").item()
            count += y_BT.numel()
    return math.exp(total / count)


def decode_speed(model, prompt, new_tokens: int, repeats: int, compile: bool):
    """(decode tok/s after the first token, tokens) best of `repeats`."""
    best, tokens = math.inf, None
    if compile:
        generate(model, [prompt], max_new_tokens=new_tokens, compile=True)  # compiles
    for _ in range(repeats):
        stamps = []
        t0 = time.perf_counter()
        tokens = generate(model, [prompt], max_new_tokens=new_tokens, compile=compile,
                          stream=lambda step: stamps.append(time.perf_counter()))[0]
        del t0
        best = min(best, stamps[-1] - stamps[0])
    return (len(stamps) - 1) / best, tokens


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/default", help="trained checkpoint or run directory")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (float is always run)")
    p.add_argument("--batches", type=int, default=16, help="validation batches (of 8 windows) for perplexity")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agree-tokens", type=int, default=16, help="greedy tokens compared with float")
    p.add_argument("--no-compile", action="store_true", help="skip the compile=True decode column")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]

    base = load_model(args.checkpoint)
    tokenizer = base.tokenizer
    if tokenizer is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer.json: perplexity needs the training tokenizer")
    train_files, val_files = split_files(default_corpus_files(), 0.05)
    _, val_bin = cached_shards(train_files, val_files, tokenizer, Path.home() / ".cache" / "moekit", progress=False)
    windows = TokenWindows(val_bin, args.seq_len, 8, shuffle=False)
    first_x, _ = next(windows.iter_eval(1))
    prompt = first_x[0, :args.prompt_len].tolist()

    rows = []
    float_bytes = model_bytes(base)
    float_tokens = None
    for method in ["float"] + methods:
        model = copy.deepcopy(base)
        if method != "float":
            quantize_model(model, method)
        report = size_report(model)
        qcount = report["quantized_weights"] or size_report(quantize_model(copy.deepcopy(base), "int8"))[
            "quantized_weights"]
        ppl = perplexity(model, windows, args.batches)
        eager, tokens = decode_speed(model, prompt, args.new_tokens, args.repeats, compile=False)
        compiled = None if args.no_compile else decode_speed(model, prompt, args.new_tokens, args.repeats, True)[0]
        if float_tokens is None:
            float_tokens = tokens
        agree = next((i for i, (a, b) in enumerate(zip(tokens, float_tokens)) if a != b), len(tokens))
        row = {"method": method, "ppl": ppl, "weight_bytes": report["total_bytes"],
               "reduction": float_bytes / report["total_bytes"], "bits": report["bits_per_quantized_weight"],
               "quantized_part_bytes": report["quantized_bytes"], "quantized_part_float_bytes": 4 * qcount,
               "decode_tok_s": eager, "compiled_tok_s": compiled,
               "greedy_agree": min(agree, args.agree_tokens)}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"  {method}: ppl {ppl:.3f}, {report['total_bytes'] / 2**20:.2f} MiB, "
                  f"eager {eager:.0f} tok/s" + (f", compiled {compiled:.0f} tok/s" if compiled else ""),
                  file=sys.stderr, flush=True)
    if args.json:
        return 0
    ppl0 = rows[0]["ppl"]
    print(f"checkpoint {args.checkpoint} | {base.num_params() / 1e6:.2f}M params | val windows "
          f"{min(args.batches * 8, windows.num_windows)} x {args.seq_len} tokens | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads | {platform.processor() or platform.machine()} | commit {git_commit()}")
    print()
    print("method | bits/weight (quantized part) | quantized part MiB | weight MiB (all) | reduction (all) | "
          f"val ppl | ppl vs float | greedy = float (of {args.agree_tokens}) | decode tok/s eager | "
          "decode tok/s compile=True")
    print("------ | ---------------------------- | ------------------ | ---------------- | --------------- | "
          "------- | ------------ | ------------------ | ------------------ | -------------------------")
    for r in rows:
        bits = "32 (float32)" if r["bits"] is None else f"{r['bits']:.3f}"
        comp = "-" if r["compiled_tok_s"] is None else f"{r['compiled_tok_s']:.0f}"
        part = r["quantized_part_bytes"] or r["quantized_part_float_bytes"]
        part_x = r["quantized_part_float_bytes"] / part
        print(f"{r['method']} | {bits} | {part / 2**20:.2f} ({part_x:.2f}x) | {r['weight_bytes'] / 2**20:.2f} | "
              f"{r['reduction']:.2f}x | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / ppl0 - 1):+.2f}% | {r['greedy_agree']} | {r['decode_tok_s']:.0f} | {comp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
