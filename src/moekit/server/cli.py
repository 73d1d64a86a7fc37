"""`moekit serve`: an OpenAI-compatible HTTP server for a checkpoint (`--help` for the flags).

By default the model runs on one torch thread fewer than torch would use, leaving a core for
the HTTP threads (benchmarks/results/serve_cpu.md). EOS ids: see `eos_ids`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

from .. import cliargs
from ..tokens import eos_token_ids


EPILOG = """examples:
  moekit serve runs/default --port 8000
  moekit serve Qwen3-30B-A3B/ --dtype bf16 --device cuda --quantize int8 --max-batch 64

from vLLM (`vllm serve MODEL ...`):
  vllm serve MODEL                   moekit serve MODEL (a moekit/HF checkpoint or run directory)
  --host, --port                     --host, --port
  --served-model-name NAME           --model-name NAME
  --max-num-seqs N                   --max-batch N
  --max-num-batched-tokens N         --max-step-tokens N
  --block-size N                     --block-size N (paged KV cache, 16 by default)
  --no-enable-prefix-caching         --no-prefix-caching (on by default, as in vLLM)
  --long-prefill-token-threshold N   --prefill-chunk N (chunked prefill is always on)
  --gpu-memory-utilization F         --kv-budget TOKENS|BYTES (an explicit KV-cache size)
  --max-model-len N                  none: the context is the model's max_seq_len
  --dtype bfloat16                   --dtype bf16 (either spelling)
  --quantization ...                 --quantize METHOD (weight-only, moekit's own formats)
  --chat-template FILE               --chat-template FILE|default
  --api-key KEY / VLLM_API_KEY       --api-key KEY / MOEKIT_API_KEY
  (uvicorn's --limit-concurrency)    --max-connections N (503 beyond it)
  (uvicorn's graceful shutdown)      --shutdown-grace S (SIGTERM: drain, then exit 0)
  (CUDA graphs, vLLM's default)      --compile (torch.compile of the decode step; eager without it)
  --enable-return-routed-experts     --enable-return-routed-experts (requests: return_routed_experts)
Requests take vLLM's extra fields top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids."""


def build_parser() -> argparse.ArgumentParser:
    from ..quantize.cli import add_runtime_arguments

    p = cliargs.parser("moekit serve", "OpenAI-compatible HTTP server for a checkpoint (continuous batching; see "
                       "moekit.server and moekit.engine).", EPILOG)
    cliargs.add_model_argument(p, "moekit checkpoint, training run dir or HF checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=cliargs.port, default=8000, help="TCP port 0..65535 (0 = any free port)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the directory name)")
    add_runtime_arguments(p)  # --quantize, --activations
    p.add_argument("--max-batch", type=int, default=32, help="most requests running at once")
    p.add_argument("--kv-budget", default=None,
                   help="KV-cache budget: tokens (e.g. 16384) or bytes (e.g. 512MiB) (default: max-batch x context)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="most requests waiting for admission; beyond it requests get HTTP 429")
    p.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens per request per step")
    p.add_argument("--max-step-tokens", type=int, default=1024,
                   help="tokens per batched forward: prompt tokens a step may prefill beside its decoding rows")
    p.add_argument("--block-size", type=int, default=16, help="KV-cache block size in tokens (paged cache)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share full prompt blocks between requests (prefix caching is on by default)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template file, or 'default' (ChatML) (default: the checkpoint's, else ChatML)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model (default: torch's default minus one, at least 1)")
    p.add_argument("--dtype", type=cliargs.dtype_name, default=None, metavar="DTYPE",
                   help=cliargs.DTYPE_HELP + " (default: as stored)")
    p.add_argument("--device", type=cliargs.device_name, default="cpu", help=cliargs.DEVICE_HELP)
    p.add_argument("--compile", action="store_true",
                   help="run the engine's decode steps through torch.compile (faster decoding; the first "
                        "decode step compiles, tens of seconds on a small CPU)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                        "(default: the MOEKIT_API_KEY environment variable, else no key)")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a client has to send a whole request (line, headers, body), and the limit on "
                        "each later socket read or write; slower clients are dropped (default 30)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="most connections served at once; beyond it clients get HTTP 503 (default 256)")
    p.add_argument("--max-prompts-per-request", type=int, default=64, metavar="N",
                   help="most completions one request may ask for (prompts x n); beyond it HTTP 400 (default 64)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM: stop accepting, let running requests finish for up to S seconds, end the rest "
                        "with an error (streams: an error event and [DONE]), exit 0 (default 30)")
    p.add_argument("--enable-return-routed-experts", action="store_true",
                   help="let requests ask for return_routed_experts: the experts each generated token went to "
                        "in each MoE layer (for routing replay in RL training; off by default, as in vLLM)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--no-malloc-tune", action="store_true", help="leave glibc's allocator settings alone")
    return p


def eos_ids(path: Path, model, tokenizer) -> List[int]:
    """End-of-sequence ids: the checkpoint's eos_token_id (generation_config.json / config.json),
    the tokenizer_config.json eos_token, and "<|endoftext|>" (moekit tokenizers' separator)."""
    ids, names = [], ["<|endoftext|>"]
    for d in (path, path / "checkpoint"):
        ids += eos_token_ids(str(d), model) or []
        config = d / "tokenizer_config.json"
        if config.is_file():
            try:
                eos = json.loads(config.read_text()).get("eos_token")
            except json.JSONDecodeError:
                eos = None
            names.append(eos.get("content") if isinstance(eos, dict) else eos)
    ids += [tokenizer.token_to_id(n) for n in names if isinstance(n, str) and tokenizer.token_to_id(n) is not None]
    return sorted({i for i in ids if 0 <= i < model.cfg.vocab_size})


def build_server(args):
    """(the bound server, its chat template) for parsed `args` (checked by `cliargs.model_path`)."""
    from ..loading import load_model
    from ..engine import Engine
    from .app import OpenAIServer
    from .chat_template import load_chat_template

    import torch

    device = cliargs.check_device(args.device)
    checkpoint = args.model if args.model is not None else args.checkpoint
    threads = args.threads if args.threads is not None else max(1, torch.get_num_threads() - 1)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be >= 0 seconds, got {args.shutdown_grace}")
    torch.set_num_threads(threads)
    path = Path(checkpoint)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {checkpoint!r} does not exist")
    model = load_model(path, dtype=args.dtype, device=device)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer.json; the server needs one")
    from ..quantize.cli import apply_runtime_arguments

    apply_runtime_arguments(model, args)  # --quantize, --activations (in place)
    template = load_chat_template(path, args.chat_template)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, kv_budget=args.kv_budget,
                    prefill_chunk=args.prefill_chunk, max_step_tokens=args.max_step_tokens,
                    block_size=args.block_size, prefix_caching=not args.no_prefix_caching, max_queue=args.max_queue,
                    eos_token_ids=eos_ids(path, model, tokenizer), compile=args.compile,
                    return_routed_experts=args.enable_return_routed_experts)
    if args.compile:  # compile before the first client waits for it
        print("moekit serve: compiling the decode step ...", file=sys.stderr, flush=True)
        engine.start().warmup()
    name = args.model_name or path.resolve().name
    api_key = args.api_key if args.api_key is not None else os.environ.get("MOEKIT_API_KEY") or None
    server = OpenAIServer(engine, tokenizer, name, template, log_requests=not args.quiet, api_key=api_key,
                          request_timeout=args.request_timeout, max_connections=args.max_connections,
                          max_prompts=args.max_prompts_per_request)
    return server.bind(args.host, args.port), template


def cli(argv: Optional[List[str]] = None) -> int:
    """`moekit serve`: serve until Ctrl-C (errors: `moekit.cli`)."""
    p = build_parser()
    args = p.parse_args(argv)
    cliargs.model_path(args, p)
    if not args.no_malloc_tune:
        from ..runtime import tune_cpu_allocator

        tune_cpu_allocator()
    server, template = build_server(args)
    import torch

    engine, kv = server.engine, server.engine.kv
    cfg = engine.model.cfg
    print(f"moekit serve: {server.ctx.model_names[0]!r} ({cfg.name}, {engine.dtype}"
          f"{', quantized ' + args.quantize if args.quantize else ''}"
          f"{', 8-bit activations' if args.activations != 'float' else ''}) on {server.url}\n"
          f"  {torch.get_num_threads()} torch threads, max batch {args.max_batch}, KV budget {kv.capacity} tokens "
          f"({kv.capacity * kv.bytes_per_token / 2**20:.1f} MiB), context {cfg.max_seq_len}, "
          f"chat template: {template.source}, eos ids {engine.eos_token_ids}", file=sys.stderr, flush=True)
    terminating = threading.Event()

    def on_sigterm(signum, frame):  # stop the accept loop (from another thread: it runs on this one)
        terminating.set()
        threading.Thread(target=server.httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    error = None
    try:
        error = server.serve_forever()
        if terminating.is_set() and error is None:
            print(f"moekit serve: SIGTERM: finishing running requests (up to {args.shutdown_grace:g} s)",
                  file=sys.stderr, flush=True)
            finished = server.drain(args.shutdown_grace)
            print("moekit serve: " + ("all requests finished" if finished else "grace period over: ended the "
                  "running requests with an error"), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    if error is not None:
        print(f"moekit serve: the engine stopped ({error}); exiting so a supervisor can restart the server",
              file=sys.stderr)
        return 1
    return 0
