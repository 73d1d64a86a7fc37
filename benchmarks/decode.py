"""Decode throughput on CPU: moekit `generate` vs HF transformers `generate`, same weights, same run.

Question: how fast does moekit decode a small MoE model at batch 1 and batch 8, against
the HF transformers implementation of the same architecture and weights?

The model is the `small` preset's size (vocab 4096, d_model 256, 4 layers, 8 heads /
4 KV heads, qk-norm per head, 16 experts of d_expert 128, top-4) with a router HF can
represent: the `small` preset itself uses a DeepSeek-style sigmoid_topk router, one
dense first layer and a shared expert, which no HF MoE class among qwen2_moe / qwen3_moe
/ mixtral / olmoe expresses, so this benchmark swaps in a Qwen3-MoE layer
(softmax_topk, norm_topk_prob=True, no shared expert, first_k_dense=0). The weights are
exported with `moekit.hf.save_hf(model, dir, model_type="qwen3_moe")` and loaded with
`AutoModelForCausalLM.from_pretrained(dir)`. The lm_head is scaled up (x50) so that
random-weight logits have no near-ties and greedy outputs can be compared exactly.

What is timed (float32, torch's default CPU threads, best of --repeats alternating runs after a warm-up):
  prefill  = from the call to the first new token (prompt forward + one sampling step);
  decode   = from the first new token to the last one, i.e. B * (new_tokens - 1) tokens
             produced by one-token forwards; tok/s = those tokens / that time.
moekit is timed twice: eager `generate` and `generate(compile=True)` (decode steps through
the torch.compile'd static-shape `Transformer.decode_step`). The compiled row's first call per
batch size compiles; that warm-up call is timed on its own ("compile s": the whole first
call, compile included) and excluded from the tok/s, which come from the later runs.
Both libraries report each new token through their streaming hook (moekit `stream=`,
HF `streamer=`), which is where the timestamps come from. Greedy outputs of moekit (eager and
compiled) are compared with HF's token by token on the same prompts.

    python benchmarks/decode.py                   # table
    python benchmarks/decode.py --json            # one JSON object per row
    python benchmarks/decode.py --batch 1 --new-tokens 32 --repeats 2
    python benchmarks/decode.py --llama-cpp medium --new-tokens 64   # moekit vs llama.cpp, same GGUF weights
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import List

import torch

from moekit import Transformer
from common import bench_config
from moekit.generate import generate
from moekit.runtime import tune_cpu_allocator
from machine import print_machine_header


def build_models(seed: int, tmpdir: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moekit.hf import save_hf

    hf_logging.disable_progress_bar()

    torch.manual_seed(seed)
    model = Transformer(bench_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    model.eval()
    save_hf(model, tmpdir, model_type="qwen3_moe")
    hf = AutoModelForCausalLM.from_pretrained(tmpdir, dtype=torch.float32).eval()
    return model, hf


class _Clock:
    """Timestamps of each new-token report; `skip` leading reports are not tokens (HF's prompt put)."""

    def __init__(self, skip: int = 0):
        self.skip, self.times = skip, []

    def __call__(self, *_):
        if self.skip:
            self.skip -= 1
            return
        self.times.append(time.perf_counter())

    put = __call__

    def end(self):
        pass


def time_moekit(model, prompts: List[List[int]], new_tokens: int, compile: bool = False):
    clock = _Clock()
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=new_tokens, stream=clock, compile=compile)
    return out, clock.times[0] - t0, clock.times[-1] - clock.times[0]


def time_hf(hf, prompts: List[List[int]], new_tokens: int):
    input_ids = torch.tensor(prompts)
    clock = _Clock(skip=1)  # HF first puts the prompt
    t0 = time.perf_counter()
    with torch.inference_mode():
        seqs = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
    out = seqs[:, input_ids.shape[1]:].tolist()
    return out, clock.times[0] - t0, clock.times[-1] - clock.times[0]


def run(batches=(1, 8), prompt_len: int = 32, new_tokens: int = 64, repeats: int = 3, seed: int = 0,
        progress: bool = True) -> List[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        model, hf = build_models(seed, tmpdir)
        gen = torch.Generator().manual_seed(seed)
        for B in batches:
            prompts = torch.randint(0, model.cfg.vocab_size, (B, prompt_len), generator=gen).tolist()
            # warm-up (and the greedy agreement check)
            mk_out, *_ = time_moekit(model, prompts, new_tokens)
            hf_out, *_ = time_hf(hf, prompts, new_tokens)
            t0 = time.perf_counter()
            mc_out, *_ = time_moekit(model, prompts, new_tokens, compile=True)  # compiles for this batch size
            compile_s = time.perf_counter() - t0

            def mismatches(out):
                return sum(a != b for ra, rb in zip(out, hf_out) for a, b in zip(ra, rb))

            mismatch, mismatch_c = mismatches(mk_out), mismatches(mc_out)
            mk, mc, hfr = [], [], []
            for _ in range(repeats):  # alternate, so drifting machine load hits all alike
                mk.append(time_moekit(model, prompts, new_tokens)[1:])
                mc.append(time_moekit(model, prompts, new_tokens, compile=True)[1:])
                hfr.append(time_hf(hf, prompts, new_tokens)[1:])
            decoded = B * (new_tokens - 1)
            mk_pre, mk_dec = min(p for p, _ in mk), min(d for _, d in mk)
            mc_pre, mc_dec = min(p for p, _ in mc), min(d for _, d in mc)
            hf_pre, hf_dec = min(p for p, _ in hfr), min(d for _, d in hfr)
            row = dict(
                model=model.cfg.name, dtype="float32", threads=torch.get_num_threads(), batch=B,
                prompt_len=prompt_len, new_tokens=new_tokens,
                moekit_prefill_ms=1e3 * mk_pre, hf_prefill_ms=1e3 * hf_pre,
                moekit_decode_tok_s=decoded / mk_dec, hf_decode_tok_s=decoded / hf_dec,
                moekit_ms_per_step=1e3 * mk_dec / (new_tokens - 1), hf_ms_per_step=1e3 * hf_dec / (new_tokens - 1),
                speedup=hf_dec / mk_dec, greedy_token_mismatches=mismatch,
                compiled_prefill_ms=1e3 * mc_pre, compiled_decode_tok_s=decoded / mc_dec,
                compiled_ms_per_step=1e3 * mc_dec / (new_tokens - 1), compiled_speedup=hf_dec / mc_dec,
                compiled_compile_s=compile_s, compiled_greedy_token_mismatches=mismatch_c,
                moekit_decode_spread=statistics.pstdev(d for _, d in mk) / mk_dec,
            )
            rows.append(row)
            if progress:
                print(f"  batch {B}: done", file=sys.stderr)
    return rows


def hybrid_config():
    """`bench_config` with Qwen3-Next's layout: three Gated DeltaNet layers then one gated-attention layer,
    the same MoE layers (so the same expert parameters per token), attention-sized delta-rule projections."""
    from moekit.presets import hybrid_layers

    base = bench_config()
    return base.replace(name="small-hybrid", layer_types=hybrid_layers(base.n_layers), attn_output_gate=True,
                        zero_centred_norm=True, rotary_dim=base.head_dim // 4, linear_num_key_heads=4,
                        linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
                        linear_fused_proj=True, max_seq_len=8192)


def run_hybrid(prompt_len: int, new_tokens: int, repeats: int, seed: int = 0) -> List[dict]:
    """Plain MoE vs hybrid (moekit generate eager and compile=True, batch 1) and transformers' generate on the
    same weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moekit.hf import save_hf

    hf_logging.disable_progress_bar()
    rows = []
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 4096, (1, prompt_len), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmpdir:
        for cfg, model_type in ((bench_config().replace(max_seq_len=8192), "qwen3_moe"), (hybrid_config(), "qwen3_next")):
            torch.manual_seed(seed)
            model = Transformer(cfg)
            with torch.no_grad():
                model.lm_head.weight.mul_(50.0)
            model.eval()
            path = f"{tmpdir}/{cfg.name}"
            save_hf(model, path, model_type=model_type)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            mk_out, *_ = time_moekit(model, prompts, new_tokens)  # warm-up and agreement
            mc_out, *_ = time_moekit(model, prompts, new_tokens, compile=True)  # compiles
            hf_out, *_ = time_hf(hf, prompts, new_tokens)
            mk, mc, hfr = [], [], []
            for _ in range(repeats):
                mk.append(time_moekit(model, prompts, new_tokens)[1:])
                mc.append(time_moekit(model, prompts, new_tokens, compile=True)[1:])
                hfr.append(time_hf(hf, prompts, new_tokens)[1:])
            decoded = new_tokens - 1
            rows.append(dict(model=cfg.name, active_params=model.num_params(active=True), prompt_len=prompt_len,
                             new_tokens=new_tokens, moekit_prefill_ms=1e3 * min(p for p, _ in mk),
                             moekit_decode_tok_s=decoded / min(d for _, d in mk),
                             compiled_decode_tok_s=decoded / min(d for _, d in mc),
                             hf_prefill_ms=1e3 * min(p for p, _ in hfr), hf_decode_tok_s=decoded / min(d for _, d in hfr),
                             greedy_token_mismatches=sum(a != b for a, b in zip(mk_out[0], hf_out[0]))
                             + sum(a != b for a, b in zip(mc_out[0], hf_out[0]))))
            print(f"  {cfg.name}: done", file=sys.stderr)
    return rows


def format_hybrid_table(rows: List[dict]) -> str:
    head = ("model", "active params", "context", "moekit prefill tok/s", "moekit decode tok/s",
            "moekit compile=True decode tok/s", "HF prefill tok/s", "HF decode tok/s", "decode vs HF",
            "compiled vs HF", "greedy == HF")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(" | ".join([
            r["model"], f"{r['active_params'] / 1e6:.2f}M", str(r["prompt_len"]),
            f"{r['prompt_len'] / r['moekit_prefill_ms'] * 1e3:.0f}", f"{r['moekit_decode_tok_s']:.1f}",
            f"{r['compiled_decode_tok_s']:.1f}",
            f"{r['prompt_len'] / r['hf_prefill_ms'] * 1e3:.0f}", f"{r['hf_decode_tok_s']:.1f}",
            f"{r['moekit_decode_tok_s'] / r['hf_decode_tok_s']:.2f}x",
            f"{r['compiled_decode_tok_s'] / r['hf_decode_tok_s']:.2f}x",
            "yes" if r["greedy_token_mismatches"] == 0 else f"NO ({r['greedy_token_mismatches']})"]))
    return "\n".join(lines)


def format_table(rows: List[dict]) -> str:
    head = ("batch", "prompt", "new", "implementation", "decode tok/s", "vs HF", "ms/step", "prefill ms",
            "compile s", "greedy == HF")
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]

    def equal(n):
        return "yes" if n == 0 else f"NO ({n} tokens differ)"

    for r in rows:
        shape = [str(r["batch"]), str(r["prompt_len"]), str(r["new_tokens"])]
        lines.append(" | ".join(shape + [
            "HF transformers", f"{r['hf_decode_tok_s']:.0f}", "1.00x", f"{r['hf_ms_per_step']:.2f}",
            f"{r['hf_prefill_ms']:.1f}", "-", "-"]))
        lines.append(" | ".join(shape + [
            "moekit", f"{r['moekit_decode_tok_s']:.0f}", f"{r['speedup']:.2f}x", f"{r['moekit_ms_per_step']:.2f}",
            f"{r['moekit_prefill_ms']:.1f}", "-", equal(r["greedy_token_mismatches"])]))
        lines.append(" | ".join(shape + [
            "moekit compile=True", f"{r['compiled_decode_tok_s']:.0f}", f"{r['compiled_speedup']:.2f}x",
            f"{r['compiled_ms_per_step']:.2f}", f"{r['compiled_prefill_ms']:.1f}", f"{r['compiled_compile_s']:.1f}",
            equal(r["compiled_greedy_token_mismatches"])]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per library; the best is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object per row instead of the table")
    p.add_argument("--hybrid", action="store_true", help="instead: the plain MoE vs a Qwen3-Next-style hybrid "
                   "(Gated DeltaNet) of the same MoE layers at batch 1, context --prompt-len, and HF on the hybrid")
    p.add_argument("--llama-cpp", choices=("small", "medium"), default=None,
                   help="instead: moekit vs llama.cpp on the same GGUF weights (f32, q8_0, q4_0; float and 8-bit "
                   "activations) at --batch sizes for this model size: benchmarks/llama_cpp_decode.py")
    p.add_argument("--no-malloc-tune", action="store_true", help="skip moekit.runtime.tune_cpu_allocator()")
    args = p.parse_args(argv)
    if args.llama_cpp:  # (it prints its own machine header and needs llama-cpp-python: pip install '.[llama]')
        import llama_cpp_decode

        return llama_cpp_decode.main(["--model", args.llama_cpp, "--batch", ",".join(map(str, args.batch)),
                                      "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                                      "--seed", str(args.seed), *(["--json"] if args.json else [])])
    print_machine_header(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is measured between the first and last new token)")
    if not args.no_malloc_tune:
        tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        print("benchmarks/decode.py needs transformers (pip install 'moekit[hf]')", file=sys.stderr)
        return 2
    if args.hybrid:
        rows = run_hybrid(args.prompt_len, args.new_tokens, args.repeats, args.seed)
        for r in rows if args.json else ():
            print(json.dumps(r))
        if not args.json:
            print(f"prefill and decode, CPU float32, batch 1, {torch.get_num_threads()} threads, torch "
                  f"{torch.__version__}, transformers {transformers.__version__}\n")
            print(format_hybrid_table(rows))
        return 1 if any(r["greedy_token_mismatches"] for r in rows) else 0
    rows = run(args.batch, args.prompt_len, args.new_tokens, args.repeats, args.seed, progress=not args.json)
    if args.json:
        for r in rows:
            print(json.dumps({**r, "torch": torch.__version__, "transformers": transformers.__version__}))
    else:
        print(f"decode throughput, CPU float32, {rows[0]['threads']} threads, torch {torch.__version__}, "
              f"transformers {transformers.__version__}")
        print(f"model: {rows[0]['model']} = the 'small' preset's size with a Qwen3-MoE router "
              "(softmax top-4 of 16, no shared expert, no dense first layer) so HF can load the same weights")
        print("decode tok/s exclude prefill (first to last new token); prefill = call to first new token;")
        print("compile s = the first compile=True call per batch size (compile + one run), excluded from tok/s\n")
        print(format_table(rows))
    bad = [r for r in rows if r["greedy_token_mismatches"] or r["compiled_greedy_token_mismatches"]]
    if bad:
        print("greedy outputs differ between moekit and HF", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
