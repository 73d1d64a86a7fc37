"""Speculative decoding on CPU: acceptance rate and speed-up of n-gram and draft-model proposals.

Question: at batch 1 on a CPU, how many tokens does each target forward yield with prompt-lookup
(n-gram) proposals and with a draft model, and what is the wall-clock speed-up over plain
`generate`, greedy and sampled?

Target: a trained checkpoint (default runs/default, the `small` preset). Proposers:
  ngram        draft-free prompt lookup (`ngram=3`, falling back to 2 and 1);
  draft        a smaller model trained on the same tokenizer (default runs/draft-tiny: the `tiny`
               preset, 2 layers of d_model 64, trained with
               `moekit train --preset tiny --tokenizer runs/default/tokenizer.json --out runs/draft-tiny`);
  int4-self    the target's own int4-g32 quantized copy as the draft (high acceptance; on a CPU
               its forward costs about as much as the target's, so it shows acceptance, not speed).
Prompts: `--prompts` windows of `--prompt-len` tokens of Python standard-library code from the
validation split (the training tokenizer), `--new-tokens` new tokens each. Greedy rows also check
that the output equals plain greedy `generate`. Sampled rows use temperature 0.8, top-p 0.95
(the speed-up there is statistical: both runs sample from the same distribution).
Time = the whole call (prefill included), summed over prompts, best of `--repeats`.

    python benchmarks/speculative.py
    python benchmarks/speculative.py --json --gammas 2,4,8
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from common import git_commit
from moekit import load_model
from moekit.data import TokenWindows, cached_shards, default_corpus_files, split_files
from moekit.generate import generate
from moekit.quantize import quantize_model
from moekit.speculative import speculative_generate
from machine import print_machine_header


def timed(fn, repeats: int):
    best, result = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def forward_ms(model, T: int, context: int, n: int = 100) -> float:
    """ms of one cached forward of T new tokens after `context` cached ones (batch 1)."""
    from moekit.model import KVCache

    cache = KVCache.allocate(model.cfg, 1, context + T, model.embed.weight.dtype, model.embed.weight.device)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, T))
    with torch.inference_mode():
        model(torch.randint(0, model.cfg.vocab_size, (1, context)), cache=cache, start=0)
        for _ in range(5):
            model(tokens, cache=cache, start=context)
        t0 = time.perf_counter()
        for _ in range(n):
            model(tokens, cache=cache, start=context)
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/default")
    p.add_argument("--draft", default="runs/draft-tiny", help="draft checkpoint (same tokenizer); '' to skip")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gammas", default="4", help="comma-separated gamma values")
    p.add_argument("--ngram", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-int4-self", action="store_true", help="skip the int4 self-draft rows")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    target = load_model(args.checkpoint)
    tok = target.tokenizer
    train_files, val_files = split_files(default_corpus_files(), 0.05)
    _, val_bin = cached_shards(train_files, val_files, tok, Path.home() / ".cache" / "moekit", progress=False)
    windows = TokenWindows(val_bin, args.prompt_len, 1, shuffle=False)
    stride = max(1, windows.num_windows // args.prompts)
    prompts = [windows._gather([i * stride])[0][0].tolist() for i in range(args.prompts)]

    proposers = {"ngram": {"ngram": args.ngram}}
    if args.draft:
        proposers["draft"] = {"draft": load_model(args.draft)}
    if not args.no_int4_self:
        proposers["int4-self"] = {"draft": quantize_model(load_model(args.checkpoint), "int4-g32")}
    modes = {"greedy": dict(temperature=0.0), "sample": dict(temperature=0.8, top_p=0.95)}
    gammas = [int(g) for g in args.gammas.split(",")]

    rows = []
    for mode, sampling in modes.items():
        def plain():
            return [generate(target, [pr], args.new_tokens, seed=i, **sampling)[0] for i, pr in enumerate(prompts)]

        plain()  # warm-up
        t_plain, plain_out = timed(plain, args.repeats)
        n_plain = sum(len(o) for o in plain_out)
        for name, kw in proposers.items():
            for gamma in gammas:
                def spec():
                    return [speculative_generate(target, pr, args.new_tokens, gamma=gamma, seed=i, **kw, **sampling)
                            for i, pr in enumerate(prompts)]

                t_spec, results = timed(spec, args.repeats)
                outs = [r[0] for r in results]
                proposed = sum(r[1].proposed for r in results)
                accepted = sum(r[1].accepted for r in results)
                passes = sum(r[1].target_forward_passes for r in results)
                n_spec = sum(len(o) for o in outs)
                row = {"mode": mode, "proposer": name, "gamma": gamma, "acceptance_rate": accepted / max(proposed, 1),
                       "tokens_per_pass": (accepted + passes) / passes, "plain_tok_s": n_plain / t_plain,
                       "spec_tok_s": n_spec / t_spec, "speedup": (n_spec / t_spec) / (n_plain / t_plain),
                       "equal_to_plain": outs == plain_out if mode == "greedy" else None}
                rows.append(row)
                if args.json:
                    print(json.dumps(row), flush=True)
                else:
                    print(f"  {mode} {name} gamma={gamma}: acc {row['acceptance_rate']:.2f}, "
                          f"{row['tokens_per_pass']:.2f} tok/pass, {row['speedup']:.2f}x", file=sys.stderr, flush=True)
    costs = {f"target T={T}": forward_ms(target, T, args.prompt_len) for T in sorted({1, *(g + 1 for g in gammas)})}
    for name, kw in proposers.items():
        if "draft" in kw:
            costs[f"{name} T=1"] = forward_ms(kw["draft"], 1, args.prompt_len)
    if args.json:
        print(json.dumps({"forward_ms": costs}))
        return 0
    print(f"target {args.checkpoint} ({target.num_params() / 1e6:.2f}M params) | draft {args.draft or '-'} | "
          f"{args.prompts} prompts x {args.prompt_len} tokens of stdlib code, {args.new_tokens} new | torch "
          f"{torch.__version__} | {torch.get_num_threads()} threads | {platform.machine()} | commit {git_commit()}")
    print()
    print("mode | proposer | gamma | acceptance | tokens / target pass | plain tok/s | speculative tok/s | "
          "speed-up | output == plain greedy")
    print("---- | -------- | ----- | ---------- | -------------------- | ----------- | ----------------- | "
          "-------- | ----------------------")
    for r in rows:
        eq = "-" if r["equal_to_plain"] is None else ("yes" if r["equal_to_plain"] else "no")
        print(f"{r['mode']} | {r['proposer']} | {r['gamma']} | {r['acceptance_rate']:.2f} | {r['tokens_per_pass']:.2f} | "
              f"{r['plain_tok_s']:.0f} | {r['spec_tok_s']:.0f} | {r['speedup']:.2f}x | {eq}")
    print()
    print("cost of one cached forward (batch 1, after the prompt), ms: "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
