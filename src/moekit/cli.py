"""The `moekit` command line. Each subcommand lives in its own module as `cli(argv) -> int`;
this file only dispatches, so `moekit --help` imports nothing heavy.

User errors are handled here, once: a subcommand raises ValueError (or an OSError, a corrupt file's
SafetensorError / torch.load error, ...) and `main` prints `moekit <command>: error: <one line>` to
stderr and returns 2. Ctrl-C returns 130, a closed stdout pipe (`moekit -h | head -1`) ends quietly;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from typing import List, Optional

# name -> (module with a `cli(argv) -> int` function, one-line help)
COMMANDS = {
    "train": ("moekit.train", "train an MoE language model (default: small preset on the Python stdlib)"),
    "bench": ("moekit.bench.cli", "benchmarks: 'demo' (default) or 'moe-layer'"),
    "convert": ("moekit.hf", "convert SRC DST: a run, moekit or HF checkpoint -> an HF checkpoint (dtype, layout, architecture, shards)"),
    "generate": ("moekit.generate", "generate text from a checkpoint (moekit generate DIR --prompt TEXT)"),
    "plot": ("moekit.plot", "loss and expert-load PNGs of a run directory"),
    "serve": ("moekit.server.cli", "OpenAI-compatible HTTP server with continuous batching (moekit serve DIR)"),
    "quantize": ("moekit.quantize.cli", "weight-only quantized copy of a checkpoint (int8, int4-gN, q8_0, q4_0)"),
    "analyze": ("moekit.analyze.cli", "parameters, FLOPs, bytes and hardware speed bounds of a model or MoE layer"),
    "profile": ("moekit.profile", "time per component under torch.profiler vs the analyzer's FLOPs share"),
    "export": ("moekit.gguf_export", "export MODEL OUT.gguf: a GGUF file llama.cpp runs (f32, f16, q8_0, q4_0)"),
    "plan": ("moekit.analyze.plan_cli", "the compute-optimal fine-grained MoE for a FLOP budget (Krajewski et al. 2024)"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("moekit")
    except PackageNotFoundError:
        return "unknown"


def usage() -> str:
    lines = ["usage: moekit [--version] COMMAND [options]", "", "Train, analyze and serve fine-grained MoE models.",
             "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `moekit COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _torch_load_file(err: BaseException) -> Optional[str]:
    """The file torch.load was reading when `err` was raised (None if torch.load did not raise it)."""
    tb = err.__traceback__
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "load" and code.co_filename.replace("\\", "/").endswith("torch/serialization.py"):
            found = str(tb.tb_frame.f_locals.get("f", "?"))
        tb = tb.tb_next
    return found


def user_error(err: BaseException) -> Optional[str]:
    """One line describing a user error (bad input, a missing or corrupt file), or None for a bug."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)):
        path = _torch_load_file(err)
        if path is not None:
            return f"corrupt or truncated checkpoint file {path}: {first}"
    if isinstance(err, OSError):
        if err.filename is not None and err.strerror:
            return f"{err.strerror}: {err.filename}"
        return first
    if isinstance(err, ValueError):  # json.JSONDecodeError included
        return first
    if type(err).__name__ == "SafetensorError":
        return f"corrupt or truncated safetensors file: {first}"
    return None


def run(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"moekit {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moekit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(COMMANDS[name][0]).cli(rest) or 0
    except KeyboardInterrupt:
        print(f"moekit {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except SystemExit as exit_:  # argparse's errors and --help
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except Exception as err:
        message = user_error(err)
        if message is None:
            raise
        print(f"moekit {name}: error: {message}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            return run(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:  # the reader went away: say nothing (Python docs, "Note on SIGPIPE")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
