"""Greedy decode on CPU at batch 1 and batch 8: moekit against llama.cpp on the same weights, same run.

Question: a user exports a moekit model with `moekit export` and runs it in llama.cpp; how does
llama.cpp's decode speed compare with moekit's own `generate` and serving `Engine` on the same
weights and threads, for one request and for 8 concurrent requests?

Models (`--model`): `small` = `benchmarks/common.py: bench_config()` (vocab 4096, d_model 256,
4 layers, 16 experts of 128, top-4, 9 M params: per-op overhead dominates a step); `medium` =
`medium_config()` below (vocab 32000, d_model 1024, 8 layers, GQA 16/4 heads, 32 experts of 512,
top-4, 0.49 B params: a step reads hundreds of MB at f32, so memory bandwidth matters). Both use a
Qwen3-MoE router, random weights with the lm_head scaled up so greedy choices have no near-ties;
exported as GGUF (llama.cpp arch `qwen3moe`) at f32, q8_0 and q4_0. moekit runs the same q8_0 /
q4_0 blocks through `moekit.quantize`, the lm_head included in the type the GGUF's output matrix has
(q8_0 under q4_0: `same_weights_as_gguf`) (llama.cpp also quantizes the activations to q8 inside its
matmuls, so its quantized tokens may differ from moekit's). llama.cpp runs through
llama-cpp-python (`pip install llama-cpp-python`, built from source), `n_threads` = torch's threads.

Rows, per batch size B (`--batch 1,8`) and weight type; every request: PROMPT_LEN prompt tokens
(B different prompts), NEW greedy new tokens:
  * moekit eager (f32, batch 1 only) and moekit `generate(prompts, compile=True)` (a static batch);
  * moekit `Engine(compile=True)` (continuous batching, in process, no HTTP), B requests submitted
    at once (B > 1 only);
  * for q8_0 / q4_0, both moekit rows again with 8-bit activations (", x8": `set_activations(model,
    "q8_0")`, llama.cpp's own scheme for these types; its "same tokens" compare with moekit eager x8);
  * llama.cpp batched (B > 1): the B sequences decoded together, one `llama_decode` per step (a
    context with n_seq_max = B, what llama.cpp's server does with B parallel slots), greedy argmax
    per sequence; llama.cpp at B = 1 and "llama.cpp one by one" (B > 1): llama-cpp-python's
    `Llama.generate`, the requests served one after another (what its high-level server does).
Aggregate tok/s = B * (NEW - 1) / (time from the first new token to the last), best of --repeats
after one warm-up. `bound` = `moekit.analyze.analyze_model(cfg, weights=<type>, batch=B)` on
`local_hardware()` (measured read bandwidth / bytes a decode step touches; `MB/token` = those bytes
/ B; `GB/s read` = tok/s x MB/token, the weight and KV bytes the analyzer counts, per second).
`same tokens`: every prompt's greedy tokens equal moekit eager's at the same weight type
(one untimed eager run); `equal prefix`: the shortest run of equal leading tokens over the prompts.

    python benchmarks/llama_cpp_decode.py [--model small|medium] [--batch 1,8] [--new-tokens 128]
                                          [--repeats 3] [--weights f32,q8_0,q4_0] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import bench_config, git_commit
from machine import print_machine_header
from moekit import MoEConfig, Transformer
from moekit.analyze import analyze_model, local_hardware
from moekit.data import train_tokenizer
from moekit.engine import Engine, SamplingParams
from moekit.generate import generate
from moekit.gguf_export import export_gguf
from moekit.gguf.common import tensor_type
from moekit.quantize import quantize_model, set_activations
from moekit.quantize.modules import QuantizedLinear

PROMPT_LEN = 16
WEIGHT_TYPES = ("f32", "q8_0", "q4_0")
ANALYZER_NAME = {"f32": "fp32", "q8_0": "q8_0", "q4_0": "q4_0"}


def medium_config():
    """bench_config()'s layer kinds at a size whose decode step is bandwidth-bound on a CPU."""
    moe = MoEConfig(d_model=1024, d_expert=512, num_experts=32, top_k=4, router="softmax_topk",
                    norm_topk_prob=True, num_shared_experts=0)
    return bench_config().replace(name="medium-qwen3moe", vocab_size=32000, d_model=1024, n_layers=8, n_heads=16,
                                  n_kv_heads=4, moe=moe)


CONFIGS = {"small": bench_config, "medium": medium_config}


def build_model(cfg, seed: int):
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    docs = [Path(torch.__file__).read_text()] * 2
    model.tokenizer = train_tokenizer(docs, 300, progress=False)  # export needs one; ids < 300 in the prompts
    return model


def same_weights_as_gguf(model, gtype: str):
    """A quantized copy holding what the GGUF of that type holds: every matrix in `gtype`, and the output
    matrix (lm_head) in the type the export gives it (q8_0 under q4_0: moekit.gguf.common.tensor_type)."""
    qmodel = quantize_model(copy.deepcopy(model), gtype)
    head_type = tensor_type("output", model.lm_head.weight, gtype)
    qmodel.lm_head = QuantizedLinear.from_float(model.lm_head, head_type)
    return qmodel


# Every runner returns (greedy tokens per prompt, seconds from the first new token to the last).
def run_generate(model, prompts, new: int, compile: bool):
    stamps = []
    outs = generate(model, prompts, max_new_tokens=new, temperature=0.0, compile=compile,
                    stream=lambda step_tokens: stamps.append(time.perf_counter()))
    return outs, stamps[-1] - stamps[0]


def run_engine(model, prompts, new: int):
    """A fresh engine (as serve.py; the compiled step is cached on the model), all prompts at once."""
    engine = Engine(model, max_batch=len(prompts), compile=True)
    stamps = []
    handles = [engine.submit(p, SamplingParams(max_tokens=new, ignore_eos=True),
                             on_event=lambda event: stamps.append(time.perf_counter()))
               for p in prompts]
    engine.run_until_idle()
    for h in handles:
        if h.completion.finish_reason != "length":
            raise RuntimeError(f"engine request ended {h.completion.finish_reason}: {h.completion.error}")
    return [h.completion.token_ids for h in handles], stamps[-1] - stamps[0]


def run_llama_one_by_one(llm, prompts, new: int):
    stamps, outs = [], []
    for prompt in prompts:
        out = []
        llm.reset()
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(int(token))
            if len(out) == new:
                break
        outs.append(out)
    return outs, stamps[-1] - stamps[0]


class LlamaBatched:
    """B sequences decoded together on llama.cpp's low-level API: one llama_decode per step over a batch
    holding each sequence's next token (seq_id = its index), greedy argmax of each sequence's logits."""

    def __init__(self, llama_cpp, llm, n_seq: int, max_len: int, threads: int):
        self.lc, self.n_seq = llama_cpp, n_seq
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * -(-max_len // 256) * 256  # kv_unified=False (default): n_ctx / n_seq per sequence
        params.n_batch = params.n_ubatch = n_seq * PROMPT_LEN
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
        self.batch = llama_cpp.llama_batch_init(n_seq * PROMPT_LEN, 0, 1)

    def close(self):
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)

    def step(self, entries):
        """entries: (token, position, seq_id, wants logits); returns the argmax of each wanted row."""
        b = self.batch
        b.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())
                for i, e in enumerate(entries) if e[3]]

    def run(self, prompts, new: int):
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        entries = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        outs = [[t] for t in self.step(entries)]  # the prompts in one decode
        t0 = time.perf_counter()
        for k in range(1, new):
            nxt = self.step([(out[-1], PROMPT_LEN + k - 1, s, True) for s, out in enumerate(outs)])
            for out, t in zip(outs, nxt):
                out.append(t)
        return outs, time.perf_counter() - t0


def equal_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(fn, repeats: int, new: int):
    fn()  # warm-up (compiles the compiled rows)
    best, outs = 0.0, None
    for _ in range(repeats):
        outs, seconds = fn()
        if any(len(out) != new for out in outs):
            raise RuntimeError(f"a run returned {[len(out) for out in outs]} tokens, not {new} each")
        best = max(best, len(outs) * (new - 1) / seconds)
    return outs, best


def rows_for_batch(llama_cpp, models, llms, prompts, new, repeats, threads, weight_types):
    """The timed rows of one batch size; models: per (weight type, activations), llms: per weight type."""
    B, rows = len(prompts), []
    context = PROMPT_LEN + new // 2
    for gtype in weight_types:
        llm, runs = llms[gtype], []
        for acts in ("float", "q8_0") if (gtype, "q8_0") in models else ("float",):
            model = models[(gtype, acts)]
            ref = run_generate(model, prompts, new, False)[0]  # moekit eager: the reference tokens
            tag = "" if acts == "float" else ", x8"
            if gtype == "f32" and B == 1:
                runs.append(("moekit eager", model, ref, lambda m=model: run_generate(m, prompts, new, False)))
            runs.append(("moekit generate compile" + tag, model, ref,
                         lambda m=model: run_generate(m, prompts, new, True)))
            if B > 1:
                runs.append(("moekit Engine compile" + tag, model, ref, lambda m=model: run_engine(m, prompts, new)))
        ref = runs[0][2]  # llama.cpp's rows: against moekit eager with float activations
        if B > 1:
            batched = LlamaBatched(llama_cpp, llm, B, PROMPT_LEN + new + 8, threads)
            runs += [("llama.cpp batched", None, ref, lambda: batched.run(prompts, new)),
                     ("llama.cpp one by one", None, ref, lambda: run_llama_one_by_one(llm, prompts, new))]
        else:
            runs.append(("llama.cpp", None, ref, lambda: run_llama_one_by_one(llm, prompts, new)))
        a = analyze_model(models[(gtype, "float")].cfg, hardware=local_hardware(), weights=ANALYZER_NAME[gtype],
                          batch=B, context=context)
        for name, _, ref, fn in runs:
            print(f"  batch {B} {gtype} {name} ...", file=sys.stderr, flush=True)
            outs, tps = measure(fn, repeats, new)
            rows.append({"batch": B, "impl": name, "weights": gtype, "threads": threads, "new_tokens": new,
                         "tok_s": round(tps, 1), "bound_tok_s": round(a["decode_tokens_per_s"], 1),
                         "mb_per_token": round(a["decode_bytes_per_step"] / B / 1e6, 2),
                         "same_tokens": outs == ref, "equal_prefix": min(map(equal_prefix, outs, ref))})
        if B > 1:
            batched.close()
    return rows


def goals(rows) -> list:
    """The issue's goals, from the rows: batch-1 >= 0.8x llama.cpp on q8_0/q4_0; batch-8 aggregate > llama.cpp's
    (for moekit with float activations, and with 8-bit ones: ", x8")."""
    lines = []
    tps = {(r["batch"], r["impl"], r["weights"]): r["tok_s"] for r in rows}
    for gtype in ("f32", "q8_0", "q4_0"):
        for tag in ("", ", x8"):
            if (1, "llama.cpp", gtype) in tps and (1, "moekit generate compile" + tag, gtype) in tps:
                ratio = tps[(1, "moekit generate compile" + tag, gtype)] / tps[(1, "llama.cpp", gtype)]
                goal = f" (goal >= 0.8x: {'met' if ratio >= 0.8 else 'not met'})" if gtype != "f32" else ""
                lines.append(f"batch 1 {gtype}{tag}: moekit compile / llama.cpp = {ratio:.2f}x{goal}")
            for B in sorted({r["batch"] for r in rows if r["batch"] > 1}):
                if (B, "moekit Engine compile" + tag, gtype) not in tps:
                    continue
                engine = tps[(B, "moekit Engine compile" + tag, gtype)]
                best = max(tps[(B, "moekit generate compile" + tag, gtype)], engine)
                peer = tps[(B, "llama.cpp batched", gtype)]
                lines.append(f"batch {B} {gtype}{tag}: best moekit / llama.cpp batched = {best / peer:.2f}x, Engine / "
                             f"llama.cpp batched = {engine / peer:.2f}x (goal > 1x: {'met' if best > peer else 'not met'})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=",".join(WEIGHT_TYPES),
                    help=f"comma-separated weight types (default {','.join(WEIGHT_TYPES)})")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    weight_types = args.weights.split(",")
    if not weight_types or any(w not in WEIGHT_TYPES for w in weight_types):
        ap.error(f"--weights takes a comma-separated subset of {','.join(WEIGHT_TYPES)}, got {args.weights!r}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        ap.error(f"--batch must be comma-separated integers, got {args.batch!r}")
    if any(b < 1 for b in batches) or args.new_tokens < 2 or args.repeats < 1:
        ap.error("--batch sizes must be >= 1, --new-tokens >= 2, --repeats >= 1")
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp from source)",
              file=sys.stderr)
        return 2
    print_machine_header(argv)
    threads = torch.get_num_threads()
    cfg = CONFIGS[args.model]()
    new = args.new_tokens
    gen = torch.Generator().manual_seed(1)
    all_prompts = torch.randint(1, 300, (max(batches), PROMPT_LEN), generator=gen).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        print(f"building {cfg.name} ...", file=sys.stderr, flush=True)
        base = build_model(cfg, args.seed)
        models = {("f32", "float"): base}
        llms = {}
        for gtype in weight_types:
            path = Path(tmp) / f"m-{gtype}.gguf"
            export_gguf(base, path, gtype)
            llms[gtype] = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_LEN + new + 8, n_threads=threads,
                                          n_threads_batch=threads, n_batch=PROMPT_LEN, verbose=False)
            if gtype != "f32":
                models[(gtype, "float")] = same_weights_as_gguf(base, gtype)
                models[(gtype, "q8_0")] = same_weights_as_gguf(base, gtype)
                set_activations(models[(gtype, "q8_0")], "q8_0")
        for B in batches:
            rows += rows_for_batch(llama_cpp, models, llms, all_prompts[:B], new, args.repeats, threads, weight_types)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    hw = local_hardware()
    print(f"commit {git_commit()}  model {cfg.name} ({base.num_params() / 1e6:.0f} M params)  prompt "
          f"{PROMPT_LEN}  new {new}  threads {threads}  read bandwidth {hw.bw / 1e9:.1f} GB/s")
    print("| batch | impl | weights | aggregate tok/s | MB/token | GB/s read | bound tok/s | share of bound "
          "| same tokens | equal prefix |\n|---:|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['impl']} | {r['weights']} | {r['tok_s']:.1f} | {r['mb_per_token']:.1f} "
              f"| {r['tok_s'] * r['mb_per_token'] / 1e3:.1f} "
              f"| {r['bound_tok_s']:.0f} | {r['tok_s'] / r['bound_tok_s']:.0%} | {r['same_tokens']} "
              f"| {r['equal_prefix']} |")
    print()
    for line in goals(rows):
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
