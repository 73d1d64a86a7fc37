"""Serving on CPU: `moekit serve` (continuous batching) under concurrent load, next to HF
transformers `generate` run sequentially and as one static batch on the same prompts, and
batch-1 decode speed next to the memory-bandwidth bound.

Question: what aggregate throughput and latency does the server give as concurrency grows,
and how does that compare with what HF transformers does with the same weights?

Model: the `small` preset's size with a Qwen3-MoE router (softmax top-4 of 16 experts, no
shared expert, no dense first layer -- the `small` preset itself uses a router HF cannot
express; same choice as benchmarks/decode.py), random weights with the lm_head scaled x50
(no near-ties, so greedy outputs can be compared token by token), float32. The same weights
are saved as a moekit checkpoint (with a byte-level BPE tokenizer of 4096 tokens trained on
a few stdlib files, which the server needs) and, through `moekit.hf.save_hf`, as an HF
checkpoint that `AutoModelForCausalLM` loads.

What is measured (every request: PROMPT_LEN random prompt tokens sent as token ids,
exactly NEW_TOKENS greedy new tokens -- ignore_eos / min_new_tokens):
  * moekit serve: a `moekit serve` subprocess (--max-batch 64; its default threads: torch's
    minus one, leaving a core for HTTP and, here, for the client); C client threads in this
    process each send requests back to back (streaming, http.client, one keep-alive-free
    connection per request) until max(16, 2C) requests are done. Aggregate tok/s = all
    new tokens / wall time; latency = request sent -> last byte; TTFT = -> first text chunk.
    The client threads share the 2 cores with the server (noted: this costs the server).
  * moekit Engine in process: the 64 prompts submitted at once to an `Engine` in this process
    (no HTTP, no client): what the batching engine itself does.
  * HF sequential: `generate` on one prompt at a time (the first 8 prompts); latency per
    request is its own service time (a queue of waiting clients would add waiting time).
  * HF static batch: one `generate` over all 64 prompts (equal lengths, no padding): every
    request's latency is the whole batch (best of two runs).
  * moekit generate static batch: the same 64 prompts in one `moekit.generate.generate` call
    (best of two runs).
  * --step-tokens 256,1024: the engine in process again, once per max_step_tokens (how many prompt
    tokens a step may prefill beside its decoding rows): throughput, TTFT and the gaps between a
    request's consecutive tokens, the latency a larger prefill step costs the requests decoding.
  * batch-1 decode: tokens/s between the first and the last new token of one request, for the
    engine in process (no HTTP) and for `moekit.generate`, next to the memory-bandwidth bound
    of the analyzer (`moekit.analyze.analyze_model(..., weights="fp32", batch=1)`:
    measured read bandwidth / bytes touched per token). Each path's best of BATCH1_ROUNDS runs, the paths
    taking turns within a round (so a slower or faster phase of the machine falls on all of them alike: the
    engine and generate(compile=True) back to back, each of the two first in every other round, then the
    others); the engine / generate row is the median over the rounds of the ratio within a round (a ratio of two bests
    follows whichever path met the machine's fastest moment, and on a machine whose speed drifts it scattered
    from run to run), with the ratio of the bests beside it.

    python benchmarks/serve.py                                   # table
    python benchmarks/serve.py --out benchmarks/results/serve_cpu.md
    python benchmarks/serve.py --json
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

import torch

from common import bench_config, git_commit
from moekit import Transformer, save_model
from moekit.generate import generate
from moekit.runtime import tune_cpu_allocator
from machine import print_machine_header

MAX_BATCH = 64
N_PROMPTS = 64
HF_SEQUENTIAL = 8


def build_checkpoints(tmp: Path, seed: int):
    import argparse as argparse_mod
    import collections
    import json as json_mod
    import typing

    from moekit.data import train_tokenizer
    from moekit.hf import save_hf

    torch.manual_seed(seed)
    model = Transformer(bench_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    model.eval()
    docs = [inspect.getsource(m) for m in (argparse_mod, collections, json_mod, typing, inspect)]
    model.tokenizer = train_tokenizer(docs, model.cfg.vocab_size, progress=False)
    save_model(model, tmp / "moekit")
    save_hf(model, tmp / "hf", model_type="qwen3_moe")
    return model


# ---------------------------------------------------------------------------- the server under load
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_kwargs(compile_: bool) -> dict:
    """Engine(compile=...) where this moekit has it (older commits have no compiled step)."""
    from moekit.engine import Engine

    return {"compile": compile_} if "compile" in inspect.signature(Engine).parameters else {}


def start_server(ckpt: Path, port: int, compile_: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moekit.cli", "serve", "--checkpoint", str(ckpt), "--port", str(port),
           "--model-name", "bench", "--max-batch", str(MAX_BATCH), "--quiet"]
    if engine_kwargs(compile_).get("compile"):  # (--no-compile: {"compile": False}, a non-empty dict)
        cmd.append("--compile")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time() + 600  # --compile compiles the decode step before listening
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"moekit serve exited: {proc.stderr.read()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moekit serve did not come up within 120 s")


def one_request(port: int, prompt: List[int], new_tokens: int, stream: bool = True) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    if not stream:
        out = json.loads(resp.read())
        conn.close()
        return {"latency": time.perf_counter() - t0, "ttft": None, "tokens": out["usage"]["completion_tokens"],
                "text": out["choices"][0]["text"]}
    ttft, tokens, text = None, 0, []
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        if chunk["choices"]:
            if ttft is None and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t0
            text.append(chunk["choices"][0]["text"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens, "text": "".join(text)}


def load_test(port: int, prompts: List[List[int]], concurrency: int, n_requests: int, new_tokens: int,
              stream: bool = True) -> dict:
    lock = threading.Lock()
    todo = list(range(n_requests))
    results, errors = [], []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                r = one_request(port, prompts[i % len(prompts)], new_tokens, stream)
            except Exception as err:  # noqa: BLE001 -- reported below
                errors.append(repr(err))
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    kind = "streamed" if stream else "not streamed"
    return summarize(f"moekit serve, {concurrency} concurrent ({kind})", concurrency, n_requests,
                     sum(r["tokens"] for r in results), wall, [r["latency"] for r in results],
                     [r["ttft"] for r in results if r["ttft"] is not None])


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarize(name, concurrency, requests, tokens, wall, latencies, ttfts=None) -> dict:
    return dict(system=name, concurrency=concurrency, requests=requests, new_tokens=tokens, wall_s=wall,
                tok_s=tokens / wall, p50_s=pct(latencies, 0.5), p99_s=pct(latencies, 0.99),
                ttft_p50_s=pct(ttfts, 0.5) if ttfts else None)


# ---------------------------------------------------------------------------- HF and in-process references
def hf_rows(hf_dir: Path, prompts, new_tokens: int):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()

    def run(batch):
        ids = torch.tensor(batch)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    run(prompts[:1])  # warm-up
    lat, seq_out = [], []
    t0 = time.perf_counter()
    for p in prompts[:HF_SEQUENTIAL]:
        t = time.perf_counter()
        seq_out += run([p])
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    rows = [summarize("HF generate, sequential (batch 1)", 1, HF_SEQUENTIAL, HF_SEQUENTIAL * new_tokens, wall, lat)]
    walls = []
    for _ in range(2):  # as for moekit: best of two, the first warms this shape up
        t0 = time.perf_counter()
        batch_out = run(prompts)
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    rows.append(summarize(f"HF generate, one static batch of {len(prompts)}", len(prompts), len(prompts),
                          len(prompts) * new_tokens, wall, [wall]))
    return rows, batch_out


def moekit_static_row(model, prompts, new_tokens: int):
    walls = []
    for _ in range(2):  # the first run warms up this shape; the best of two is reported
        t0 = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=new_tokens)
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    return summarize(f"moekit generate, one static batch of {len(prompts)}", len(prompts), len(prompts),
                     len(prompts) * new_tokens, wall, [wall]), out


def engine_row(model, prompts, new_tokens: int, compile_: bool) -> dict:
    """The engine in this process (no HTTP): all prompts submitted at once, max batch 64."""
    from moekit.engine import Engine, SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    kw = engine_kwargs(compile_)
    if kw:  # compile outside the timed runs
        Engine(model, max_batch=MAX_BATCH, **kw).warmup()
    walls = []
    for _ in range(3):  # best of three
        engine = Engine(model, max_batch=MAX_BATCH, **kw)
        t0 = time.perf_counter()
        done = engine.generate(prompts, sp)
        walls.append(time.perf_counter() - t0)
    wall = min(walls)
    how = "compiled step" if kw.get("compile") else "eager step"
    return summarize(f"moekit Engine in process (no HTTP, {how}), {len(prompts)} at once", len(prompts), len(prompts),
                     sum(c.generated_tokens for c in done), wall, [c.latency for c in done],
                     [c.time_to_first_token for c in done])


def step_token_list(text: str) -> List[int]:
    """--step-tokens: comma-separated integers >= 1."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def step_tokens_rows(model, prompts, new_tokens: int, compile_: bool, values: List[int]) -> List[dict]:
    """The engine in this process, all prompts at once, for each max_step_tokens (the prompt tokens a step may
    prefill beside its decoding rows): throughput, time to first token and the gaps between a request's
    consecutive tokens (a step that prefills more delays the tokens of the requests already decoding)."""
    from moekit.engine import Engine, SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    kw = engine_kwargs(compile_)
    if kw:  # compile outside the timed runs
        Engine(model, max_batch=MAX_BATCH, **kw).warmup()
    rows = []
    for value in values:
        best = None
        for _ in range(2):  # best of two, each a fresh engine (no prefix cache carried over)
            engine = Engine(model, max_batch=MAX_BATCH, max_step_tokens=value, prefill_chunk=min(128, value), **kw)
            times = [[] for _ in prompts]
            t0 = time.perf_counter()
            handles = [engine.submit(p, sp, on_event=lambda event, t=t: t.append(time.perf_counter()))
                       for p, t in zip(prompts, times)]
            engine.run_until_idle()
            wall = time.perf_counter() - t0
            if best is None or wall < best[0]:
                best = (wall, times, [h.completion for h in handles])
        wall, times, done = best
        gaps = [b - a for t in times for a, b in zip(t, t[1:])]
        rows.append(dict(max_step_tokens=value, tok_s=sum(c.generated_tokens for c in done) / wall,
                         ttft_p50_s=pct([c.time_to_first_token for c in done], 0.5),
                         gap_p50_s=pct(gaps, 0.5), gap_p99_s=pct(gaps, 0.99), gap_max_s=max(gaps)))
    return rows


BATCH1_ROUNDS = 15


def batch1_decode(model, prompt, new_tokens: int, compile_: bool) -> dict:
    from moekit.engine import Engine, SamplingParams

    kw = engine_kwargs(compile_)
    engines = {"invariant": Engine(model, **kw)}  # long-lived, as in a server
    if "batch_invariant" in inspect.signature(Engine).parameters:
        engines["fast"] = Engine(model, **kw, batch_invariant=False)

    def engine_run(which="invariant"):
        times = [time.perf_counter() for _ in engines[which].submit(prompt, SamplingParams(max_tokens=new_tokens,
                                                                                            ignore_eos=True))]
        return (new_tokens - 1) / (times[-1] - times[0])

    def generate_run(compiled: bool):
        times = []
        generate(model, [prompt], max_new_tokens=new_tokens, compile=compiled,
                 stream=lambda _: times.append(time.perf_counter()))
        return (new_tokens - 1) / (times[-1] - times[0])

    for which in engines:  # warm-up (and compilation)
        engine_run(which), engine_run(which)
    generate_run(False)
    if compile_:
        generate_run(True), generate_run(True)
    runs = {"eng": [], "eng_fast": [], "gen": [], "gen_c": []}
    for r in range(BATCH1_ROUNDS):  # the paths in turn (see the module docstring)
        pair = [("eng", engine_run)] + ([("gen_c", lambda: generate_run(True))] if compile_ else [])
        for name, run in pair[::-1] if r % 2 else pair:  # the compared two back to back, each first every other round
            runs[name].append(run())
        if "fast" in engines:
            runs["eng_fast"].append(engine_run("fast"))
        runs["gen"].append(generate_run(False))
    eng, gen = max(runs["eng"]), max(runs["gen"])
    eng_fast = max(runs["eng_fast"]) if runs["eng_fast"] else None
    gen_c = max(runs["gen_c"]) if compile_ else gen  # --no-compile: eager in both rows
    base = runs["gen_c"] if compile_ else runs["gen"]
    ratio = statistics.median(e / g for e, g in zip(runs["eng"], base))
    ratio_fast = statistics.median(e / g for e, g in zip(runs["eng_fast"], base)) if runs["eng_fast"] else None
    context = len(prompt) + new_tokens // 2
    from moekit.analyze import analyze_model, local_hardware

    hw = local_hardware()
    bound = analyze_model(model.cfg, hardware=hw, weights="fp32", batch=1, context=context)["decode_tokens_per_s"]
    how = (f"moekit.analyze.analyze_model(weights='fp32', batch=1, context={context}) on local_hardware() "
           f"(measured read bandwidth {hw.bw / 1e9:.1f} GB/s)")
    return dict(engine_tok_s=eng, engine_fast_tok_s=eng_fast, engine_compiled=bool(kw.get("compile")), generate_tok_s=gen,
                generate_compiled_tok_s=gen_c, engine_ratio=ratio, engine_fast_ratio=ratio_fast,
                bound_tok_s=bound, bound_how=how, context=context)


# ---------------------------------------------------------------------------- report
def table(rows: List[dict]) -> str:
    head = ["system", "concurrency", "requests", "new tokens", "wall s", "aggregate tok/s", "p50 latency s",
            "p99 latency s", "p50 TTFT s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ttft = "-" if r["ttft_p50_s"] is None else f"{r['ttft_p50_s']:.3f}"
        lines.append(f"| {r['system']} | {r['concurrency']} | {r['requests']} | {r['new_tokens']} | {r['wall_s']:.2f} "
                     f"| {r['tok_s']:.0f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {ttft} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        load = "?"
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
            f"load average {load} when the report was written")


def commit() -> str:
    try:
        sha = git_commit()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "benchmarks/serve.py"]).returncode
        return sha + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads here and in the server (OMP_NUM_THREADS); default: torch's choice")
    p.add_argument("--skip-hf", action="store_true", help="leave out the HF transformers rows")
    p.add_argument("--engine-only", action="store_true",
                   help="only the in-process engine and batch-1 rows (no server, no HF): for old/new side by side")
    p.add_argument("--no-compile", action="store_true", help="run the engine's eager decode step")
    p.add_argument("--no-stream", action="store_true", help="non-streamed requests (no TTFT)")
    p.add_argument("--out", default=None, help="also write the markdown report here")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines instead of the table")
    p.add_argument("--step-tokens", default=None, type=step_token_list,
                   help="also: the engine in process with each of these comma-separated max_step_tokens")
    args = p.parse_args(argv)
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server process
    levels = [int(c) for c in args.concurrency.split(",")]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        print("building checkpoints ...", file=sys.stderr)
        model = build_checkpoints(tmp, args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(1, model.cfg.vocab_size, (N_PROMPTS, args.prompt_len), generator=gen).tolist()
        compile_ = not args.no_compile
        served = {}
        if not args.engine_only:
            port = free_port()
            proc = start_server(tmp / "moekit", port, compile_)
            try:
                load_test(port, prompts, 4, 8, 8)  # warm-up
                for c in levels:
                    print(f"moekit serve at concurrency {c} ...", file=sys.stderr)
                    rows.append(load_test(port, prompts, c, max(16, 2 * c), args.new_tokens, not args.no_stream))
                for i in range(4):  # greedy outputs of the server, for the comparison with HF
                    served[i] = one_request(port, prompts[i], args.new_tokens)["text"]
            finally:
                proc.terminate()
                proc.wait(30)
        print("moekit engine in process ...", file=sys.stderr)
        rows.append(engine_row(model, prompts, args.new_tokens, compile_))
        print("moekit generate static batch ...", file=sys.stderr)
        static_row, static_out = moekit_static_row(model, prompts, args.new_tokens)
        rows.append(static_row)
        if served:
            agree = all(model.tokenizer.decode(static_out[i]) == served[i] for i in served)
            notes.append(f"greedy text of moekit serve == moekit generate on {len(served)} prompts: {agree}")
        if not args.skip_hf and not args.engine_only:
            print("HF transformers ...", file=sys.stderr)
            hf, hf_out = hf_rows(tmp / "hf", prompts, args.new_tokens)
            rows += hf
            same = sum(a == b for a, b in zip(static_out, hf_out))
            notes.append(f"greedy tokens of HF static batch == moekit generate: {same}/{len(prompts)} prompts")
        steps = []
        if args.step_tokens:
            print("moekit engine in process, by max_step_tokens ...", file=sys.stderr)
            steps = step_tokens_rows(model, prompts, args.new_tokens, compile_, args.step_tokens)
        print("batch-1 decode ...", file=sys.stderr)
        b1 = batch1_decode(model, prompts[0], 128, compile_)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        print(json.dumps({"batch1_decode": b1, "step_tokens": steps, "notes": notes}))
        return 0
    cmd = "python benchmarks/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        "# Serving on CPU: `moekit serve` (continuous batching) vs HF transformers `generate`",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {machine()}  ",
        f"Commit: {commit()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Model `{model.cfg.name}` ({model.num_params() / 1e6:.1f} M params, {model.num_params(active=True) / 1e6:.1f} M "
        f"active; float32, random weights). Every request: {args.prompt_len} prompt tokens, exactly "
        f"{args.new_tokens} greedy new tokens. Server: --max-batch {MAX_BATCH}, default threads and KV budget "
        f"(max-batch x context), prefill chunk 128. See the script's docstring for what each row measures.",
        "",
        table(rows),
        "",
        *(["The engine in process, all prompts at once, by max_step_tokens (prefill chunk min(128, value); gaps: "
           "between a request's consecutive tokens):", "",
           "| max_step_tokens | aggregate tok/s | p50 TTFT s | p50 gap ms | p99 gap ms | max gap ms |",
           "|---:|---:|---:|---:|---:|---:|",
           *[f"| {r['max_step_tokens']} | {r['tok_s']:.0f} | {r['ttft_p50_s']:.2f} | {r['gap_p50_s'] * 1e3:.0f} | "
             f"{r['gap_p99_s'] * 1e3:.0f} | {r['gap_max_s'] * 1e3:.0f} |" for r in steps], ""] if steps else []),
        "Batch-1 decode (one request, 128 new tokens, tokens/s between first and last new token):",
        "",
        "| path | tok/s | share of bound |",
        "|---|---:|---:|",
        f"| moekit engine (in process, batch-invariant {'compiled' if b1['engine_compiled'] else 'eager'} step) | "
        f"{b1['engine_tok_s']:.0f} | {b1['engine_tok_s'] / b1['bound_tok_s']:.0%} |",
        *([f"| moekit engine (in process, batch_invariant=False, {'compiled' if b1['engine_compiled'] else 'eager'} "
           f"step) | {b1['engine_fast_tok_s']:.0f} | {b1['engine_fast_tok_s'] / b1['bound_tok_s']:.0%} |"]
          if b1["engine_fast_tok_s"] else []),
        f"| moekit generate (eager) | {b1['generate_tok_s']:.0f} | {b1['generate_tok_s'] / b1['bound_tok_s']:.0%} |",
        f"| moekit generate ({'compile=True' if b1['engine_compiled'] else 'eager again: --no-compile'}) | "
        f"{b1['generate_compiled_tok_s']:.0f} | "
        f"{b1['generate_compiled_tok_s'] / b1['bound_tok_s']:.0%} |",
        f"| engine / generate(row above): median of the {BATCH1_ROUNDS} rounds' ratios | {b1['engine_ratio']:.2f}x"
        + (f" (batch_invariant=False: {b1['engine_fast_ratio']:.2f}x)" if b1["engine_fast_ratio"] else "")
        + f"; ratio of the bests {b1['engine_tok_s'] / b1['generate_compiled_tok_s']:.2f}x | |",
        f"| memory-bandwidth bound | {b1['bound_tok_s']:.0f} | 100% |",
        "",
        f"Bound: {b1['bound_how']}.",
        "",
        *[f"- {n}" for n in notes],
        "",
    ])
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
