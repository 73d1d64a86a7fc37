"""CLI errors and help: `moekit.cliargs`, and the real `moekit` command in a subprocess (user errors
are one line on stderr with exit code 2, never a traceback)."""

import argparse
import os
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
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--json", action="store_true", help="as JSON")
    text = p.format_help()
    assert "number of steps (default: 7)" in text and "seed (default: 0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


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


# -- the real command, in subprocesses started together (each pays torch's import once) ----------

def tiny_checkpoint(path: Path) -> Path:
    from moekit import ModelConfig, Transformer, save_model

    torch.manual_seed(0)
    save_model(Transformer(ModelConfig.preset("tiny", max_seq_len=64)), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> CompletedProcess-like (returncode, stdout, stderr) of every command below, run at once."""
    tmp = tmp_path_factory.mktemp("cli")
    good = tiny_checkpoint(tmp / "good")
    bad = tiny_checkpoint(tmp / "bad")
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    gen = ["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]
    commands = {
        "version": [MOEKIT, "--version"],
        # the reader is gone before moekit writes (`true`), or after one line (`head -1`)
        "help_pipe": ["sh", "-c", f"'{MOEKIT}' generate --help | true; '{MOEKIT}' -h | head -1"],
        "prefix": [MOEKIT, "generate", str(good), "--prompt-ids", "1", "--max-new-token", "3"],
        "port": [MOEKIT, "serve", str(good), "--port", "99999"],
        "trunc_generate": [MOEKIT, *gen, str(bad)],
        "trunc_quantize": [MOEKIT, "quantize", str(bad), str(tmp / "q"), "--method", "int4"],
        "trunc_serve": [MOEKIT, "serve", str(bad), "--port", "0", "--no-malloc-tune"],
        "trunc_convert": [MOEKIT, "convert", str(bad), str(tmp / "converted")],
    }
    if not torch.cuda.is_available():
        commands["cuda_generate"] = [MOEKIT, *gen, str(good), "--device", "cuda"]
        commands["cuda_serve"] = [MOEKIT, "serve", str(good), "--device", "cuda", "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, cmd in commands.items()}
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        out[name] = subprocess.CompletedProcess(commands[name], proc.returncode, stdout, stderr)
    out["good"], out["tmp"] = good, tmp
    return out


def assert_user_error(proc, *words):
    """Exit code 2 and one `moekit <cmd>: error: ...` line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moekit {proc.args[1]}: error: "), proc.stderr
    for w in words:
        assert w in lines[0], proc.stderr


def test_version(runs):
    from importlib.metadata import version

    assert runs["version"].returncode == 0 and runs["version"].stdout == f"moekit {version('moekit')}\n"


def test_help_into_a_closed_pipe_is_quiet(runs):
    proc = runs["help_pipe"]
    assert proc.stdout == "usage: moekit [--version] COMMAND [options]\n"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_abbreviated_flag_is_an_error(runs):
    proc = runs["prefix"]
    assert proc.returncode == 2 and "unrecognized arguments: --max-new-token" in proc.stderr, proc.stderr


def test_port_out_of_range(runs):
    proc = runs["port"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --port: port must be in 0..65535, got 99999" in proc.stderr


def test_positional_and_checkpoint_flag_give_the_same_output(runs, capsys):
    from moekit import load_model
    from moekit.cli import main
    from moekit.generate import generate

    good, outs = str(runs["good"]), []
    for model in ([good], ["--checkpoint", good], [good, "--checkpoint", good]):
        assert main(["generate", *model, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
        outs.append(capsys.readouterr().out.split())
    expected = generate(load_model(good), [[1, 2, 3]], max_new_tokens=4)[0]
    assert outs == [[str(t) for t in expected]] * 3
    assert main(["generate", good, "--checkpoint", good + "x", "--prompt-ids", "1"]) == 2
    assert "two models given" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["trunc_generate", "trunc_quantize", "trunc_serve", "trunc_convert"])
def test_truncated_safetensors_is_one_line_error(runs, name):
    assert_user_error(runs[name])


def test_quantize_int4_is_the_analyzers_int4(runs, capsys):
    import json

    from moekit import load_model
    from moekit.analyze.precision import get_precision
    from moekit.cli import main

    out = runs["tmp"] / "q4"
    assert main(["quantize", str(runs["good"]), str(out), "--method", "int4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == get_precision("int4").fmt.name == "int4-g128"
    assert load_model(out).quantization["method"] == "int4-g128"
    assert main(["quantize", str(runs["good"]), "--method", "int4"]) == 2
    assert "give the output directory" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("name", ["cuda_generate", "cuda_serve"])
def test_device_cuda_without_cuda(runs, name):
    assert_user_error(runs[name], "--device cuda: CUDA is not available on this machine", "use --device cpu")


# -- help texts ------------------------------------------------------------------------------------

def parsers():
    from moekit import generate, profile
    from moekit.quantize import cli as quantize_cli
    from moekit.server import cli as serve_cli

    return {"generate": generate.build_parser(), "serve": serve_cli.build_parser(),
            "quantize": quantize_cli.build_parser(), "profile": profile.build_parser()}


@pytest.mark.parametrize("name", ["generate", "serve", "quantize", "profile"])
def test_every_option_has_help_and_no_abbreviations(name):
    p = parsers()[name]
    assert p.allow_abbrev is False
    for action in p._actions:
        assert action.help and action.help.strip(), (name, action.option_strings or action.dest)
        if action.choices:
            assert all(str(c) in p.format_help() for c in action.choices), (name, action.dest)


def test_serve_help_names_the_vllm_flags():
    text = parsers()["serve"].format_help()
    for vllm, ours in [("--max-num-seqs", "--max-batch"), ("--served-model-name", "--model-name"),
                       ("--max-model-len", "max_seq_len"), ("--max-num-batched-tokens", "--max-step-tokens")]:
        line = next(line for line in text.splitlines() if vllm in line)
        assert ours in line, line


# -- which exceptions are user errors (one line, exit 2) and which are bugs (a traceback) --------

def raised(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects what the real call raised
        return err
    raise AssertionError("no exception")


def test_user_error_classification(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from moekit.cli import user_error

    save_file({"w": torch.zeros(64, 64)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    assert user_error(raised(lambda: load_file(str(tmp_path / "w.safetensors")))).startswith(
        "corrupt or truncated safetensors file: ")
    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "state.pt")
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    message = user_error(raised(lambda: torch.load(tmp_path / "state.pt")))
    assert message.startswith(f"corrupt or truncated checkpoint file {tmp_path / 'state.pt'}: ")
    assert "\n" not in message
    assert user_error(raised(lambda: open(tmp_path / "missing.json"))) == (
        f"No such file or directory: {tmp_path / 'missing.json'}")
    assert user_error(raised(lambda: json.loads("{"))).startswith("Expecting property name")
    assert user_error(raised(lambda: torch.zeros(2) @ torch.zeros(3))) is None  # a RuntimeError elsewhere: a bug
    assert user_error(raised(lambda: [][1])) is None
