"""Shared argparse pieces for moekit's commands: one parser style, the model argument, and the
`type=` converters for dtypes, devices and ports.

    p = cliargs.parser("moekit generate", "Generate text from a checkpoint.")
    cliargs.add_model_argument(p, "checkpoint directory (moekit, run dir or HF format)")
    p.add_argument("--dtype", type=cliargs.dtype_name, default=None, help=cliargs.DTYPE_HELP)
    p.add_argument("--device", type=cliargs.device_name, default="cpu", help=cliargs.DEVICE_HELP)
    args = p.parse_args(argv)
    path, device = cliargs.model_path(args, p), cliargs.check_device(args.device)

Parsers take no abbreviated flags (`--max-new-token` is an error, not `--max-new-tokens`) and
show each flag's default in `--help`. `device_name` checks the spelling when parsing;
`check_device` (call it before loading anything) also checks that the device exists here.
"""

from __future__ import annotations

import argparse
import re
from typing import Dict, Optional

# every accepted spelling -> the torch dtype name
DTYPES: Dict[str, str] = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp64": "float64", "float64": "float64",
}
DTYPE_HELP = "weights dtype: bf16|bfloat16, fp16|float16|half, fp32|float32|float, fp64|float64"
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_HELP = "torch device: auto, cpu, cuda, cuda:N or mps (auto = cuda when available, else cpu)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows '(default: X)' after a flag's help unless X is None/False or the help already says it;
    keeps the description and epilog line breaks as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, description: str, epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """An ArgumentParser without prefix matching of flags, showing defaults in --help."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=HelpFormatter, allow_abbrev=False)


def add_model_argument(p: argparse.ArgumentParser, help: str) -> None:
    """A positional `model` (optional) and `--checkpoint DIR`, its alias; read them with `model_path`."""
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=help)
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="the same as the positional MODEL")


def model_path(args: argparse.Namespace, p: argparse.ArgumentParser) -> str:
    """The model given positionally or with --checkpoint; p.error(...) (exit 2) if neither or two differ."""
    if args.model is None and args.checkpoint is None:
        p.error("give the model: MODEL (positional) or --checkpoint DIR")
    if args.model is not None and args.checkpoint is not None and args.model != args.checkpoint:
        p.error(f"two models given: {args.model!r} and --checkpoint {args.checkpoint!r}; give one")
    return args.model if args.model is not None else args.checkpoint


def dtype_name(text: str) -> str:
    """argparse type=: 'bf16', 'bfloat16', ... -> the torch dtype name ('bfloat16')."""
    name = DTYPES.get(text.strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose one of {', '.join(DTYPES)}")
    return name


def _device_error(text: str) -> Optional[str]:
    if text in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", text):
        return None
    return f"unknown device {text!r}; choose one of {', '.join(DEVICES)}"


def device_name(text: str) -> str:
    """argparse type=: a device spelling (auto, cpu, cuda, cuda:N, mps); availability: `check_device`."""
    err = _device_error(text)
    if err:
        raise argparse.ArgumentTypeError(err)
    return text


def check_device(text: str) -> str:
    """The device name if this machine has it ('auto' resolved to cuda or cpu); else ValueError."""
    import torch

    err = _device_error(text)
    if err:
        raise ValueError(f"--device: {err}")
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine (torch {torch.__version__} "
                             "built without CUDA or no GPU visible); use --device cpu")
        count = torch.cuda.device_count()
        index = int(text.split(":")[1]) if ":" in text else 0
        if index >= count:
            raise ValueError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0 to "
                             f"cuda:{count - 1}); use one of those or --device cpu")
    if text == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine; use --device cpu")
    return text


def port(text: str) -> int:
    """argparse type=: a TCP port 0..65535 (0 = any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer in 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value
