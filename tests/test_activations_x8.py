"""8-bit activations for q8_0 / q4_0 weights (moekit/quantize/activations.py, cpu_matvec.c's ".x8"
methods): the block quantization of x against a per-element loop written here, the C kernel (its
AVX-512 VNNI path and its portable C path) against a float64 product of the quantized x and the
dequantized weight, NaN, batch invariance, the torch path where the kernel is off, eager against
compiled generation, and the refusals of `set_activations` and `--activations`. The engine runs these
models in tests/test_engine_matrix.py (q4_0_x8, q8_0_x8_shared_dense)."""

import math
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from moekit import ModelConfig, Transformer, cpu_matvec
from moekit.generate import generate
from moekit.quantize import quantize_model, set_activations
from moekit.quantize.activations import fake_quantize_x8, quantize_x8
from moekit.quantize.modules import QuantizedWeight

METHODS = ("q8_0", "q4_0")
needs_kernel = pytest.mark.skipif(not cpu_matvec.available(), reason=f"no CPU kernel: {cpu_matvec.error()}")


def quantize_by_hand(x_K):
    """One row, block by block, element by element: d = max|x| / 127, q = round-half-even(x * (1/d))."""
    xs = x_K.tolist() + [0.0] * (-len(x_K) % 32)
    q, d = [], []
    for b in range(0, len(xs), 32):
        block = torch.tensor(xs[b:b + 32], dtype=torch.float32)
        db = torch.tensor(max(abs(v) for v in block.tolist()), dtype=torch.float32) / 127
        inv = 1 / db if db != 0 else torch.tensor(0.0)
        q.append([int(torch.round(v * inv)) for v in block])
        d.append(float(db))
    return q, d


def test_block_quantization_equals_a_loop_by_hand():
    torch.manual_seed(0)
    x_RK = torch.randn(3, 70) * torch.tensor([0.01, 1.0, 300.0])[:, None]
    x_RK[1, 32:64] = 0.0  # an all-zero block: d = 0, q = 0
    q_RB32, d_RB = quantize_x8(x_RK)
    for r in range(3):
        q, d = quantize_by_hand(x_RK[r])
        assert q_RB32[r].tolist() == q and d_RB[r].tolist() == d
    assert q_RB32.abs().max() <= 127
    err = (fake_quantize_x8(x_RK) - x_RK).abs().amax(-1) / x_RK.abs().amax(-1)
    assert (err <= 0.5 / 127 + 1e-6).all()  # at most half a step of the largest value


def x8_reference(qw, x_RK, index_R=None):
    """float64: the quantized x times the dequantized weight (exact products, one rounding at the end)."""
    xq_RK = fake_quantize_x8(x_RK).double()
    if index_R is None:
        return xq_RK @ qw.dense(dtype=torch.float64).t()
    return (qw.dense(index_R, torch.float64) * xq_RK[:, None]).sum(-1)


@needs_kernel
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [32, 96, 100, 1024])  # 100: x padded to whole blocks; N = 45: a partial panel
def test_kernel_matches_the_quantized_reference(method, K, tmp_path):
    torch.manual_seed(1)
    qw = QuantizedWeight.from_float(torch.randn(45, K), method)
    libs = {"native": cpu_matvec.library(),
            "portable": cpu_matvec.load(cpu_matvec.build(["-mno-avx512f"], cache_dir=tmp_path))}
    from moekit.quantize import formats

    panels = {name: cpu_matvec.x8_pack(lib, method, qw.qweight, qw.scale_f32) for name, lib in libs.items()}
    assert torch.equal(panels["native"][0], panels["portable"][0])  # one layout for both paths
    for R in (1, 5, 8, 13):  # 13: a tile of 8 rows and one of 5
        x_RK = torch.randn(R, K) * 2
        ref = x8_reference(qw, x_RK)
        for name, lib in libs.items():
            y = cpu_matvec.x8_call(lib, method, formats.get_format(method).pad(x_RK), *panels[name], 45, None)
            assert ((y.double() - ref).abs().max() / ref.abs().max()) < 2e-6, (name, R)
        # and it is not the float-activation product: the quantization is visible
        assert not torch.allclose(x_RK.double() @ qw.dense(dtype=torch.float64).t(), ref, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("method", METHODS)
def test_gathered_pairs_and_rows_are_bitwise_the_same_alone(method):
    torch.manual_seed(2)
    qw = QuantizedWeight.from_float(torch.randn(5, 24, 96), method)
    qw.set_activations("q8_0")
    index_P = torch.tensor([2, 0, 2, 2, 4, 2, 2, 2, 2, 2, 2, 1])  # expert 2: 9 pairs, two tiles
    x_PK = torch.randn(len(index_P), 96)
    together = qw.gathered_matvec(index_P, x_PK[:, None])
    ref = x8_reference(qw, x_PK, index_P)
    assert ((together.double() - ref).abs().max() / ref.abs().max()) < 2e-6
    for p in range(len(index_P)):
        assert torch.equal(qw.gathered_matvec(index_P[p:p + 1], x_PK[p:p + 1, None])[0], together[p])
    linear = QuantizedWeight.from_float(torch.randn(40, 96), method)
    linear.set_activations("q8_0")
    rows = linear.linear(x_PK)
    for r in range(len(x_PK)):
        assert torch.equal(linear.linear(x_PK[r:r + 1])[0], rows[r])


@needs_kernel
def test_nan_in_x_reaches_the_output():
    qw = QuantizedWeight.from_float(torch.randn(8, 64), "q4_0")
    qw.set_activations("q8_0")
    x = torch.randn(2, 64)
    x[0, 40] = math.nan
    y = qw.linear(x)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()


def tiny_model(method):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # no near-ties between the top two logits
    return quantize_model(model.eval(), method, quantize_head=True)


@pytest.mark.parametrize("method", METHODS)
def test_the_torch_path_computes_the_same_math(method, monkeypatch):
    """Without the kernel (no compiler, other CPUs) the same quantized product runs in torch."""
    model = tiny_model(method)
    set_activations(model, "q8_0")
    tokens = torch.tensor([[5, 17, 300, 42, 8, 3]])
    with torch.no_grad():
        kernel = model(tokens)
        monkeypatch.setattr(cpu_matvec, "_ready", False)
        torch_path = model(tokens)
        set_activations(model, "float")
        float_x = model(tokens)
    torch.testing.assert_close(torch_path, kernel, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(float_x, kernel, rtol=1e-4, atol=1e-3)  # the setting changes the numbers


@needs_kernel
@pytest.mark.parametrize("method", METHODS)
def test_compiled_generation_equals_eager(method):
    model = tiny_model(method)
    assert set_activations(model, "q8_0") > 0
    prompts = [[5, 17, 300, 42], [8, 3], [11, 12, 13]]
    eager = generate(model, prompts, max_new_tokens=6)
    assert generate(model, prompts, max_new_tokens=6, compile=True) == eager
    assert generate(model, prompts[:1], max_new_tokens=6, compile=True) == eager[:1]


def test_refusals():
    model = Transformer(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="needs q8_0 or q4_0 weights; this model has no quantized weights"):
        set_activations(model, "q8_0")
    with pytest.raises(ValueError, match="activations must be one of float, q8_0; got 'int4'"):
        set_activations(model, "int4")
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match="this model has int8"):
        set_activations(model, "q8_0")


def test_cli_refuses_activations_without_a_block_format(tmp_path):
    from moekit import save_model

    save_model(Transformer(ModelConfig.preset("tiny")), tmp_path / "m")
    out = subprocess.run([sys.executable, "-m", "moekit.cli", "generate", str(tmp_path / "m"), "--prompt-ids",
                          "1,2", "--max-new-tokens", "2", "--activations", "q8_0"], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "needs q8_0 or q4_0 weights" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "moekit.cli", "generate", str(tmp_path / "m"), "--prompt-ids", "1,2",
                         "--max-new-tokens", "2", "--quantize", "q4_0", "--activations", "q8_0", "--print-ids"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


@needs_kernel
def test_panels_and_indices_that_do_not_fit_are_refused():
    lib = cpu_matvec.library()
    qw = QuantizedWeight.from_float(torch.randn(3, 20, 64), "q4_0")  # 3 experts, N = 20, K = 64
    panels = cpu_matvec.x8_pack(lib, "q4_0", qw.qweight, qw.scale_f32)
    x = torch.randn(2, 64)
    with pytest.raises(IndexError, match=r"outside \[0, 3\)"):
        cpu_matvec.x8_call(lib, "q4_0", x, *panels, 20, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="does not fit"):  # K
        cpu_matvec.x8_call(lib, "q4_0", torch.randn(2, 96), *panels, 20, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="does not fit"):  # N beyond the panels
        cpu_matvec.x8_call(lib, "q4_0", x, *panels, 40, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="does not fit"):  # the other format's panel size
        cpu_matvec.x8_call(lib, "q8_0", x, *panels, 20, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index"):
        cpu_matvec.x8_call(lib, "q4_0", x, *panels, 20, None)


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64" or not shutil.which("cc"),
                    reason="the kernel is built on x86-64 Linux with a C compiler")
def test_the_kernel_builds_here():
    """Where it can be built it must be: a source that fails to compile would otherwise only skip the tests."""
    assert cpu_matvec.available(), cpu_matvec.error()
