"""Batch-1 decode on CPU: moekit against llama.cpp on the same weights, same run.

Question: a user exports a moekit model with `moekit export` and runs it in llama.cpp; how does
llama.cpp's decode speed compare with moekit's own `generate` on the same weights and threads?

The model: `benchmarks/common.py: bench_config()` (the `small` preset's size with a Qwen3-MoE
layer: vocab 4096, d_model 256, 4 layers, 16 experts of 128, top-4), random weights with the
lm_head scaled up so greedy choices have no near-ties; exported as GGUF (llama.cpp arch
`qwen3moe`) at f32, q8_0 and q4_0. llama.cpp runs through llama-cpp-python (`pip install
llama-cpp-python`, built from source: no prebuilt wheel on PyPI), `n_threads` = torch's thread
count. moekit runs `generate` eager and `generate(compile=True)`, f32, and with q8_0 and
q4_0 weights (`moekit.quantize`, the same blocks the GGUF holds; llama.cpp also quantizes the activations
to q8 inside its matmuls, so its quantized tokens may differ from moekit's).

Timed: the prompt (PROMPT_LEN tokens) is evaluated, then NEW tokens are decoded greedily; tok/s =
(NEW - 1) / (time from the first new token to the last). Best of --repeats after one warm-up.
The greedy tokens of every row are compared with moekit eager's at the same weight type (`same tokens`:
f32 rows with moekit f32, q8_0 rows with moekit q8_0 — the same q8_0 blocks, so equal tokens mean
llama.cpp computes what moekit computes on quantized weights too).

    python benchmarks/llama_cpp_decode.py [--new-tokens 128] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import bench_config, git_commit
from machine import print_machine_header
from moekit import Transformer
from moekit.data import train_tokenizer
from moekit.generate import generate
from moekit.gguf_export import export_gguf
from moekit.quantize import quantize_model

PROMPT_LEN = 16


def build_model(seed: int):
    torch.manual_seed(seed)
    cfg = bench_config()
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    docs = [Path(torch.__file__).read_text()] * 2
    model.tokenizer = train_tokenizer(docs, 300, progress=False)  # export needs one; ids < 300 in the prompt
    return model


def time_moekit(model, prompt, new: int, compile: bool):
    stamps = []
    out = generate(model, [prompt], max_new_tokens=new, temperature=0.0, compile=compile,
                   stream=lambda step_tokens: stamps.append(time.perf_counter()))[0]
    return out, (new - 1) / (stamps[-1] - stamps[0])


def time_llama(llm, prompt, new: int):
    stamps, out = [], []
    llm.reset()
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        out.append(int(token))
        if len(out) == new:
            break
    return out, (new - 1) / (stamps[-1] - stamps[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: pip install llama-cpp-python (builds llama.cpp from source)",
              file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    model = build_model(args.seed)
    prompt = [int(t) for t in torch.randint(1, 300, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))]
    new = args.new_tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        reference = {}  # per weight type: the first row's tokens (moekit eager)
        runs = [("moekit eager f32", lambda: time_moekit(model, prompt, new, False)),
                ("moekit compile f32", lambda: time_moekit(model, prompt, new, True))]
        for gtype in ("q8_0", "q4_0"):
            qmodel = quantize_model(build_model(args.seed), gtype)
            runs.append((f"moekit compile {gtype}", lambda m=qmodel: time_moekit(m, prompt, new, True)))
        for gtype in ("f32", "q8_0", "q4_0"):
            path = Path(tmp) / f"m-{gtype}.gguf"
            export_gguf(model, path, gtype)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT_LEN + new + 8, n_threads=threads,
                                  n_threads_batch=threads, n_batch=PROMPT_LEN, verbose=False)
            runs.append((f"llama.cpp {gtype}", lambda llm=llm: time_llama(llm, prompt, new)))
        for name, fn in runs:
            fn()  # warm-up (compiles the compiled row)
            best, out = 0.0, None
            for _ in range(args.repeats):
                out, tps = fn()
                best = max(best, tps)
            ref = reference.setdefault(name.split()[-1], out)
            same = out == ref
            prefix = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), len(out))
            rows.append({"impl": name, "threads": threads, "new_tokens": new, "decode_tok_s": round(best, 1),
                         "same_tokens": same, "equal_prefix": prefix})
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print_machine_header()
    print(f"commit {git_commit()}  model {bench_config().name}  prompt {PROMPT_LEN}  new {new}  threads {threads}")
    print(f"{'impl':<22}{'decode tok/s':>14}{'same tokens':>13}{'equal prefix':>14}")
    for r in rows:
        print(f"{r['impl']:<22}{r['decode_tok_s']:>14.1f}{str(r['same_tokens']):>13}{r['equal_prefix']:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
