"""CLI errors and help: `moekit.cliargs`, and the real `moekit` command in a subprocess (user errors
are one line on stderr with exit code 2, never a traceback)."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import cliargs

MOEKIT = str(Path(sys.executable).parent / "moekit")


# -- cliargs -----------------------------------------------------------------------------------

def test_parser_refuses_abbreviated_flags():
    p = cliargs.parser("prog", "d")
    p.add_argument("--max-steps", type=int, default=1, help="h")
    assert p.parse_args(["--max-steps", "3"]).max_steps == 3
    with pytest.raises(SystemExit):
        p.parse_args(["--max-step", "3"])


def test_help_shows_defaults_but_not_none():
    p = cliargs.parser("prog", "d")
    p.add_argument("--steps", type=int, default=7, help="number of steps")
    p.add_argument("--name", default=None, help="a name")
    text = p.format_help()
    assert "number of steps (default: 7)" in text and "(default: None)" not in text


def test_model_argument_positional_or_checkpoint():
    p = cliargs.parser("prog", "d")
    cliargs.add_model_argument(p, "model dir")
    assert cliargs.model_path(p.parse_args(["a"]), p) == "a"
    assert cliargs.model_path(p.parse_args(["--checkpoint", "a"]), p) == "a"
    assert cliargs.model_path(p.parse_args(["a", "--checkpoint", "a"]), p) == "a"
    for argv in ([], ["a", "--checkpoint", "b"]):
        with pytest.raises(SystemExit):
            cliargs.model_path(p.parse_args(argv), p)


@pytest.mark.parametrize("text,name", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16"),
                                       ("half", "float16"), ("float16", "float16"), ("FP32", "float32"),
                                       ("float", "float32"), ("fp64", "float64"), ("float64", "float64")])
def test_dtype_spellings_give_the_torch_name(text, name):
    assert cliargs.dtype_name(text) == name
    assert isinstance(getattr(torch, name), torch.dtype)


def test_dtype_unknown_lists_the_choices():
    with pytest.raises(argparse.ArgumentTypeError, match="bf16.*float64"):
        cliargs.dtype_name("int3")


def test_device_names():
    for ok in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert cliargs.device_name(ok) == ok
    for bad in ("gpu", "cuda:", "cuda:x", "tpu"):
        with pytest.raises(argparse.ArgumentTypeError, match="cuda:N"):
            cliargs.device_name(bad)
    assert cliargs.check_device("cpu") == "cpu"
    assert cliargs.check_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"--device cuda:{n}: "):
        cliargs.check_device(f"cuda:{n}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_check_device_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"^--device cuda: CUDA is not available on this machine \(torch "):
        cliargs.check_device("cuda")


def test_port_range():
    assert cliargs.port("0") == 0 and cliargs.port("65535") == 65535
    for bad in ("-1", "65536", "99999", "http"):
        with pytest.raises(argparse.ArgumentTypeError, match="0..65535"):
            cliargs.port(bad)
