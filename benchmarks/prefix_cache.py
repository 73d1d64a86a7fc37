"""Prefix caching on CPU: requests sharing a long system prompt, with and without it.

Question: how much time to first token and throughput does the engine's prefix cache save when
every request starts with the same system prompt, and how many such requests run at once under
a fixed KV budget?

Model: benchmarks/serve.py's (the `small` preset's size with a Qwen3-MoE router, random
weights, lm_head x50, float32). Workload: one request with the system prompt runs first (it
fills the cache, as the traffic before would), then N requests (the same SYSTEM tokens + SUFFIX
random tokens of their own, NEW greedy tokens each) are submitted at once to the in-process
`Engine` (no HTTP). Measured per setting (prefix caching off / on, same engine otherwise,
best of two): p50 / max time to first token of the N, their wall time and new tokens/s, prompt
tokens actually prefilled, the hit rate, and whether the generated tokens equal the
caching-off run's. Then the same N requests with a larger max_tokens under a fixed KV budget:
the most requests running at once, next to what reserving prompt + max_tokens up front (the
engine before paging) admits.

    python benchmarks/prefix_cache.py                      # table
    python benchmarks/prefix_cache.py --out benchmarks/results/prefix_cache_cpu.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common import bench_config, git_commit
from machine import machine_header, print_machine_header
from moekit import Transformer
from moekit.engine import Engine, SamplingParams
from moekit.runtime import tune_cpu_allocator


def build_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(bench_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model.eval()


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(model, system, suffixes, new_tokens: int, caching: bool, max_batch: int, budget=None, max_tokens=None):
    """All requests at once; with `max_tokens`, each is cancelled after `new_tokens` (a client's stop)."""
    engine = Engine(model, max_batch=max_batch, kv_budget=budget, prefix_caching=caching)
    engine.generate([system + [1]], SamplingParams(max_tokens=2, ignore_eos=True))  # fills the cache
    before = dict(engine.metrics()["totals"])
    sp = SamplingParams(max_tokens=max_tokens or new_tokens, ignore_eos=True)
    counts = [0] * len(suffixes)

    def counter(i):
        def on_event(event):
            counts[i] += len(event.token_ids)
        return on_event

    handles = [engine.submit(system + s, sp, on_event=counter(i)) for i, s in enumerate(suffixes)]
    t0, most = time.perf_counter(), 0
    while engine.step():
        most = max(most, engine.metrics()["running"])
        for i, h in enumerate(handles):
            if counts[i] >= new_tokens and not h.done:
                h.cancel()
    wall = time.perf_counter() - t0
    done = [h.result() for h in handles]
    m = engine.metrics()
    prefilled = m["totals"]["prompt_tokens"] - before.get("prompt_tokens", 0)
    hits = m["totals"].get("prefix_hit_tokens", 0) - before.get("prefix_hit_tokens", 0)
    return dict(caching=caching, wall_s=wall, tok_s=sum(c.generated_tokens for c in done) / wall,
                ttft_p50_s=pct([c.time_to_first_token for c in done], 0.5),
                ttft_max_s=max(c.time_to_first_token for c in done), prefilled=prefilled,
                hit_rate=hits / sum(len(system) + len(s) for s in suffixes), max_running=most,
                preemptions=m["preemptions"], tokens=[c.token_ids for c in done])


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system-len", type=int, default=384)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--budget", type=int, default=2048, help="KV budget (tokens) of the concurrency run")
    p.add_argument("--budget-max-tokens", type=int, default=96, help="max_tokens of the concurrency run")
    p.add_argument("--budget-new-tokens", type=int, default=24, help="tokens generated in the concurrency run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    model = build_model(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    V = model.cfg.vocab_size
    system = torch.randint(1, V, (args.system_len,), generator=gen).tolist()
    suffixes = torch.randint(1, V, (args.requests, args.suffix_len), generator=gen).tolist()
    rows = {}
    for caching in (False, True, False, True):  # interleaved, best of two by wall time
        r = run(model, system, suffixes, args.new_tokens, caching, args.requests)
        if caching not in rows or r["wall_s"] < rows[caching]["wall_s"]:
            rows[caching] = r
    same = rows[True]["tokens"] == rows[False]["tokens"]
    # concurrency under a fixed budget: requests stop after budget-new-tokens of their max_tokens
    conc = {}
    for caching in (False, True):
        engine_run = run(model, system, suffixes, args.budget_new_tokens, caching, args.requests, args.budget,
                         args.budget_max_tokens)
        conc[caching] = engine_run
    prompt_len = args.system_len + args.suffix_len
    reserved = args.budget // (prompt_len + args.budget_max_tokens)
    if args.json:
        for r in list(rows.values()) + list(conc.values()):
            print(json.dumps({k: v for k, v in r.items() if k != "tokens"}))
        return 0
    cmd = "python benchmarks/prefix_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Prefix caching on CPU: requests sharing a long system prompt", "",
        f"Command: `{cmd.strip()}`  ", machine_header() + "  ", f"Commit: {git_commit()} (+ working tree)  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}", "",
        f"Model `{model.cfg.name}` (float32, random weights), in-process `Engine` (batch-invariant, eager step, "
        f"prefill chunk 128, block size 16, max batch {args.requests}). {args.requests} requests submitted at once, "
        f"each {args.system_len} shared system tokens + {args.suffix_len} of its own, {args.new_tokens} greedy new "
        f"tokens; one request with the system prompt ran first. Best of two by wall time.", "",
        "| prefix caching | p50 TTFT s | max TTFT s | wall s | new tok/s | prompt tokens prefilled | hit rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows.values():
        lines.append(f"| {'on' if r['caching'] else 'off'} | {r['ttft_p50_s']:.3f} | {r['ttft_max_s']:.3f} | "
                     f"{r['wall_s']:.2f} | {r['tok_s']:.1f} | {r['prefilled']} | {r['hit_rate']:.0%} |")
    lines += ["", f"Generated tokens with caching == without: {same}.", "",
              f"Concurrency under a fixed KV budget of {args.budget} tokens: the same requests with "
              f"max_tokens={args.budget_max_tokens}, each stopping after {args.budget_new_tokens} tokens (ignore_eos, "
              f"as a client's stop would). Reserving prompt + max_tokens up front (the engine before paging) runs "
              f"{args.budget} // ({prompt_len} + {args.budget_max_tokens}) = {reserved} at once.", "",
              "| paged engine, prefix caching | most requests running at once | preemptions | wall s |",
              "|---|---:|---:|---:|"]
    for r in conc.values():
        lines.append(f"| {'on' if r['caching'] else 'off'} | {r['max_running']} | {r['preemptions']} | "
                     f"{r['wall_s']:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
