"""MLA decode: the expanded form (k/v rebuilt from the cached latent every step) against the absorbed
form (kv_b_proj folded into the query and the output), batch 1 at a long context, same model and
weights, greedy tokens checked equal. Also the cache bytes per token against plain MHA of the same heads.

    .venv/bin/python benchmarks/mla_decode.py [--context 2048] [--new 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import print_machine_header  # noqa: E402

from moekit import ModelConfig, Transformer  # noqa: E402
from moekit.generate import generate  # noqa: E402


def config(context: int) -> ModelConfig:
    """DeepSeek-V3's attention proportions scaled down (128 heads -> 16, d 7168 -> 1024)."""
    return ModelConfig(name="mla-bench", vocab_size=4096, d_model=1024, n_layers=4, n_heads=16, attention="mla",
                       q_lora_rank=384, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                       v_head_dim=64, rope_interleave=True, d_ff=2048, max_seq_len=context + 64)


def set_absorb(model: Transformer, absorb: bool) -> None:
    for layer in model.layers:
        layer.attn.absorb = absorb


def timed(model, prompt, new: int) -> tuple:
    start = time.perf_counter()
    out = generate(model, [prompt], max_new_tokens=1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(model, [prompt], max_new_tokens=new)[0]
    total = time.perf_counter() - start
    return out, new / max(total - first, 1e-9)  # decode tokens/s, the prefill subtracted


def main(argv=None) -> int:
    print_machine_header(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=2048, help="prompt tokens before decoding")
    p.add_argument("--new", type=int, default=32, help="tokens decoded")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each form (median)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = config(args.context)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.context,)).tolist()
    speeds = {False: [], True: []}
    outs = {}
    for _ in range(args.repeats):
        for absorb in (False, True):
            set_absorb(model, absorb)
            outs[absorb], tok_s = timed(model, prompt, args.new)
            speeds[absorb].append(tok_s)
    latent = model.new_cache(1, 8).nbytes_per_slot
    mha = cfg.n_layers * 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) * 4
    print(f"model: {cfg.n_layers} MLA layers, {cfg.n_heads} heads, kv_lora_rank {cfg.kv_lora_rank}, "
          f"qk_rope {cfg.qk_rope_head_dim}, fp32; context {args.context}, {args.new} new tokens, batch 1, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print("| form | decode tok/s | runs |")
    print("|---|---|---|")
    for absorb, name in ((False, "expanded (k/v from the latent each step)"), (True, "absorbed (kv_b_proj folded)")):
        runs = ", ".join(f"{s:.1f}" for s in speeds[absorb])
        print(f"| {name} | {statistics.median(speeds[absorb]):.1f} | {runs} |")
    print(f"greedy tokens equal: {outs[False] == outs[True]}")
    print(f"cache bytes per token: {latent} (latent + rotary key) vs {mha} as MHA of the same heads (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
