"""Does it fit: the analyzer's memory section against numbers worked by hand, the fp8 peak, the refusal of a
layer name as a model, the plots (legend, batches that fit) and an import of the analyzer without torch."""

import json
import math
import subprocess
import sys

import pytest

from moekit.analyze import analyze, from_hf_config, render, resolve_model
from moekit.analyze.cli import cli

GIB = 2**30

# L 2, d 64, h 4, h_kv 2, d_h 16, V 100, d_ff 128 (SwiGLU), untied
LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
# worked by hand: embed 100·64; per layer q 64·64, k 32·64, v 32·64, o 64·64, 2 norms of 64, w13+w2 3·64·128;
# final norm 64; head 100·64
LLAMA_PARAMS = 100 * 64 + 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 2 * 64 + 3 * 64 * 128) + 64 + 100 * 64


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "moekit.cli", "analyze", *argv], capture_output=True, text=True)


def test_memory_worked_by_hand():
    assert LLAMA_PARAMS == 86_848
    r = analyze(from_hf_config(LLAMA), weights="bf16", batch=3, context=100, memory_gib=0.001)
    m = r["memory"]
    usable = 0.9 * 0.001 * GIB
    weights = LLAMA_PARAMS * 2
    kv_per_token = 2 * 2 * 2 * 16 * 2  # 2 · L · h_kv · d_h · bytes
    assert r["kv_bytes_per_token"] == kv_per_token == 256
    inf = m["inference"]
    assert inf["weights"] == weights and inf["kv_cache"] == 3 * 100 * kv_per_token
    assert inf["total"] == weights + 76_800 and inf["fits"] and r["fits"]
    assert m["usable"] == pytest.approx(usable) and inf["max_batch"] == math.floor((usable - weights) / (100 * 256)) == 30
    assert inf["devices"] == 1
    # training: 16 B per parameter (bf16 weights 2 + grads 2 + fp32 master 4 + m 4 + v 4)
    tr = m["training"]
    assert tr["states"] == 16 * LLAMA_PARAMS
    # activations per token per layer, elements: attention 2·64 + 2·4·16 + 2·2·16, FFN 2·64 + 3·128; head 64 (bf16)
    # plus 100 fp32 logits
    per_token = 2 * 2 * ((2 * 64 + 2 * 4 * 16 + 2 * 2 * 16) + (2 * 64 + 3 * 128)) + 2 * 64 + 4 * 100
    assert tr["activation_bytes_per_token"] == per_token == 3856
    assert tr["tokens"] == 300 and tr["activations"] == 300 * per_token
    assert not tr["fits"] and tr["max_batch"] == 0  # 1.39 MB of states > 0.97 MB usable
    assert tr["devices"] == math.ceil((16 * LLAMA_PARAMS + 300 * per_token) / usable) == 3


def test_moe_activations_and_fp32_training_by_hand():
    moe = dict(LLAMA, model_type="mixtral", intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    tr = analyze(from_hf_config(moe), weights="bf16", context=10)["memory"]["training"]
    # MoE FFN per layer: 2·d + E router logits + 2·K·n (H per routed copy)
    assert tr["activation_bytes_per_token"] == 2 * 2 * ((2 * 64 + 2 * 4 * 16 + 2 * 2 * 16) + (2 * 64 + 8 + 2 * 2 * 32)) + 2 * 64 + 4 * 100
    tr32 = analyze(from_hf_config(LLAMA), weights="fp32", context=10)["memory"]["training"]
    assert tr32["dtype"] == "fp32" and tr32["states"] == (4 + 4 + 4 + 4) * LLAMA_PARAMS  # no master copy


def test_deepseek_v3_fp8_on_one_h200_does_not_fit():
    res = run_cli("deepseek-v3", "--hardware", "h200", "--weights", "fp8")
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith("WARNING: does not fit on one h200") and "the weights alone do not fit" in first
    assert "needs 5 devices" in first  # 625 GiB / (0.9 · 141 GiB) = 4.9
    assert "decode tok/s (B=1), if it fit" in res.stdout and "DOES NOT FIT" in res.stdout
    r = analyze(resolve_model("deepseek-v3"), hardware="h200", weights="fp8")
    inf = r["memory"]["inference"]
    assert r["fits"] is False and inf["max_batch"] == 0
    assert 620 * GIB < inf["weights"] < 630 * GIB  # ~1 byte per weight for 671B parameters
    assert inf["devices"] == math.ceil(inf["total"] / (0.9 * 141 * GIB)) == 5
    # with eight of them (--memory for their sum) it fits, and the largest batch is the KV that fits beside the weights
    r8 = analyze(resolve_model("deepseek-v3"), hardware="h200", weights="fp8", memory_gib=8 * 141)
    kv_seq = 4096 * 61 * (512 + 64) * 2  # MLA latent, bf16
    assert r8["fits"] and r8["memory"]["inference"]["max_batch"] == math.floor((0.9 * 8 * 141 * GIB - inf["weights"]) / kv_seq)


def test_a_model_that_fits_has_no_warning(capsys):
    assert cli(["tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# tiny") and "WARNING" not in out and "if it fit" not in out


def test_fp8_uses_the_fp8_peak():
    arch = resolve_model("qwen3-30b-a3b")
    bf16 = analyze(arch, hardware="h100", weights="bf16", batch=8)
    fp8 = analyze(arch, hardware="h100", weights="fp8", batch=8)
    assert bf16["hardware"]["flops_used"] == 989e12 and fp8["hardware"]["flops_used"] == 1979e12  # datasheet
    assert fp8["hardware"]["peak_used"] == "fp8 dense"
    # prefill of 8 x 4096 tokens is compute-bound either way: twice the peak, twice the tokens/s
    assert bf16["prefill_bound"] == fp8["prefill_bound"] == "compute"
    assert fp8["prefill_tokens_per_s"] / bf16["prefill_tokens_per_s"] == pytest.approx(1979 / 989)
    # no fp8 figure for an A100: the 16-bit peak, and the report says so
    a100 = analyze(arch, hardware="a100", weights="fp8")
    assert a100["hardware"]["flops_used"] == 312e12 and "no fp8 peak" in a100["hardware"]["peak_used"]
    assert "1.98 PFLOP/s fp8 dense" in render(fp8).splitlines()[0]


def test_layer_name_given_as_model_points_to_layer():
    res = run_cli("deepseek-v3.2")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("moekit analyze: error: 'deepseek-v3.2' is a published MoE layer (d, n, K, E), "
                                  "not a model: use --layer deepseek-v3.2")
    assert cli(["--layer", "deepseek-v3.2"]) == 0


def test_roofline_names_points_in_a_legend():
    pytest.importorskip("matplotlib")
    from moekit.analyze.plots import operations, roofline_figure

    arch = resolve_model("deepseek-v3")
    r = analyze(arch, hardware="h200")
    fig = roofline_figure(arch, r)
    ax = fig.axes[0]
    assert len(ax.texts) == 0  # no inline labels on the points
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    ops = operations(arch, r)
    assert len(legend) == len(ops) + 1  # the roofline + one entry per operation
    for label, ai in ops:
        assert any(t.startswith(label + ":") for t in legend)


def test_decode_plot_stops_at_the_largest_batch_that_fits():
    pytest.importorskip("matplotlib")
    from moekit.analyze.plots import decode_vs_batch_figure

    arch = resolve_model("qwen3-30b-a3b")
    r = analyze(arch, hardware="h100", context=32768)
    kv_seq = 32768 * 2 * 48 * 4 * 128 * 2
    expected = math.floor((0.9 * 80 * GIB - r["weight_bytes"]) / kv_seq)
    assert r["memory"]["inference"]["max_batch"] == expected == 5
    xs = decode_vs_batch_figure(arch, r).axes[0].get_lines()[0].get_xdata()
    assert max(xs) == expected


def test_weights_help_lists_every_precision():
    from moekit.analyze.precision import NAMES_HELP, precisions

    assert [n.split(" ")[0] for n in NAMES_HELP.split(", ")] == list(precisions())


def test_analyzer_modules_import_no_torch():
    """The analyzer's own modules (moekit/analyze, shape, cliargs) run a --layer analysis with torch blocked;
    the package moekit/__init__.py (which imports torch) is stood in for by an empty package."""
    code = ("import importlib.util, sys, types\n"
            "pkg = types.ModuleType('moekit'); pkg.__path__ = list(importlib.util.find_spec('moekit').submodule_search_locations)\n"
            "sys.modules['moekit'] = pkg; sys.modules['torch'] = None\n"
            "import moekit.analyze.cli as c\n"
            "assert c.cli(['--layer', 'deepseek-v3.2', '--json']) == 0\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["params_total"] == 256 * 3 * 7168 * 2048 + 256 * 7168


def test_help_and_a_batch_too_large(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0 and "--memory GIB" in capsys.readouterr().out
    # weights fit but the KV of 8 sequences of 32768 tokens does not: the warning names the batch that does
    assert cli(["qwen3-30b-a3b", "--context", "32768", "--batch", "8"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("WARNING: does not fit on one h100") and "batch 5 fits at this context" in first
