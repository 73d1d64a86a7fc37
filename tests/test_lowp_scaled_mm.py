"""The scaled_mm execution of the FP8 recipes (moekit.lowp.scaled, Recipe.product): the same quantised
numbers as the emulation, multiplied by torch._scaled_mm instead of being dequantised, so outputs and all
three gradients equal the emulation's up to fp32 accumulation order (the emulation itself is checked
against fp32 in test_lowp_recipes.py); shapes off the 16-multiple grid; the expert GEMMs; the fallback
with its reason; the `gemm=` option; a tiny model training under gemm=scaled_mm; CUDA checks (gpu tier)."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.lowp.formats import fp8_fake_quant
from moekit.lowp.matmul import lowp_linear
from moekit.lowp.recipes import EXECUTIONS, get_recipe, with_options
from moekit.lowp.scaled import fp8_quantize
from moekit.lowp.transform import apply_precision
from moekit.moe.grouped import experts_grouped
from moekit.presets import MODEL_PRESETS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small GEMMs: on a shared 2-core machine a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SCALED = ("fp8-tensorwise", "fp8-rowwise")  # what torch._scaled_mm runs on the CPU
SHAPES = [(37, 100, 51), (64, 128, 96), (3, 7, 5)]  # M, K, N: two off the 16-multiple grid


def scaled_mm_calls(fn) -> int:
    """How many aten::_scaled_mm ran inside fn (torch's profiler: the real op, not a stand-in)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm")


def linear_run(spec, x, w, dy, bias=None):
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = lowp_linear(xr, wr, get_recipe(spec), bias)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("shape", SHAPES)
def test_scaled_mm_equals_the_emulation_in_all_three_gemms(name, shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
    x[0, 0] = 40.0  # an outlier: the scales matter
    emulated = linear_run(f"{name}:gemm=emulate", x, w, dy)
    scaled = linear_run(f"{name}:gemm=scaled_mm", x, w, dy)
    for got, want in zip(scaled, emulated):  # y, dx, dW
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    exact = (x @ w.T, dy @ w, dy.T @ x)  # and both are quantised (not the fp32 product)
    assert all(not torch.allclose(s, e, rtol=1e-3, atol=1e-3) for s, e in zip(scaled, exact))
    if shape == SHAPES[0]:  # the profiler is slow: count the kernels once per recipe
        assert scaled_mm_calls(lambda: linear_run(f"{name}:gemm=scaled_mm", x, w, dy)) == 3
        assert scaled_mm_calls(lambda: linear_run(f"{name}:gemm=emulate", x, w, dy)) == 0


def test_scaled_mm_in_bf16_with_bias_and_leading_dims():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 48, generator=g).bfloat16()
    w, b = torch.randn(40, 48, generator=g).bfloat16(), torch.randn(40, generator=g).bfloat16()
    dy = torch.randn(2, 9, 40, generator=g).bfloat16()
    emulated = linear_run("fp8-rowwise:gemm=emulate", x, w, dy, b)
    scaled = linear_run("fp8-rowwise:gemm=scaled_mm", x, w, dy, b)
    for got, want in zip(scaled, emulated):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        # both round the same fp32 sums to bf16: at most one bf16 ulp apart
        assert ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs() + 1e-6).all()


@pytest.mark.parametrize("scaling", ["tensor", "row", "tile", "block"])
def test_codes_and_compact_scales_are_the_emulated_values(scaling):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 300, generator=g) * torch.logspace(-12, 12, 300)  # rows/cols off the 128 grid
    x[0, :2], x[1] = torch.tensor([0.0, -0.0]), x[1] * 1e-30  # zeros; a row of FP8 subnormals after scaling
    for elem in ("e4m3", "e5m2"):
        codes, s = fp8_quantize(x, elem, scaling)
        assert codes.dtype == getattr(torch, "float8_e4m3fn" if elem == "e4m3" else "float8_e5m2")
        assert codes.is_contiguous()
        if scaling in ("tile", "block"):  # compact: one scale per 1x128 tile / 128x128 block
            assert s.shape == ((256 if scaling == "block" else 200) // (128 if scaling == "block" else 1), 3)
            s = s.repeat_interleave(128, 1)
            s = s.repeat_interleave(128, 0) if scaling == "block" else s
        values = (codes.float() * s)[:200, :300]
        want = fp8_fake_quant(x, elem, scaling)  # the round-to-nearest cast is torch's; fp_round is moekit's
        assert torch.equal(values, want) and torch.equal(values.signbit(), want.signbit())


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("role", ["fwd", "dgrad"])
def test_expert_gemms_as_scaled_mm_equal_the_emulated_ones(name, role):
    g = torch.Generator().manual_seed(3)
    E, R, K, N = 3, 50, 40, 24
    a_RK = torch.randn(R, K, generator=g)
    b_ENK = torch.randn(E, N, K, generator=g) if role == "fwd" else torch.randn(E, K, N, generator=g).transpose(1, 2)
    b_ENK[1] *= 30.0  # per-expert scales differ
    groups = [(0, 0, 12), (1, 12, 30), (2, 30, 44), (1, 44, 47)]  # a tail range of expert 1; rows 47.. in none
    recipe = get_recipe(f"{name}:gemm=scaled_mm")
    got = recipe.grouped_product(role, a_RK, b_ENK, groups)
    a_q, b_q = recipe.operands(role, a_RK, b_ENK)  # the emulation quantises all rows at once
    want = torch.zeros(R, N)
    for e, start, end in groups:
        want[start:end] = a_q[start:end] @ b_q[e].T
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if role == "fwd":
        assert scaled_mm_calls(lambda: recipe.grouped_product(role, a_RK, b_ENK, groups)) == len(groups)


@pytest.mark.parametrize("name", SCALED)
def test_routed_experts_run_as_scaled_mm_and_equal_the_emulation(name):
    g = torch.Generator().manual_seed(7)
    T, D, F, E, K = 37, 48, 24, 4, 2
    x = torch.randn(T, D, generator=g)
    w13, w2 = torch.randn(E, 2 * F, D, generator=g) / 7, torch.randn(E, D, F, generator=g) / 5
    gates = torch.rand(T * K, generator=g)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).reshape(-1)

    def run(spec, layout):
        leaves = [t.clone().requires_grad_(True) for t in (x, w13, w2, gates)]
        out = experts_grouped(*leaves[:3], leaves[3], tok, exp, layout, gemm=get_recipe(spec))
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad for t in leaves]

    want = run(f"{name}:gemm=emulate", "compact")
    for layout in ("compact", "padded", 7):  # grid blocks, tails, or both
        for got, ref in zip(run(f"{name}:gemm=scaled_mm", layout), want):
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # six expert GEMMs per expert (two forward, two dgrad, two wgrad), one scaled matmul each
    assert scaled_mm_calls(lambda: run(f"{name}:gemm=scaled_mm", "compact")) == 6 * E


def test_execution_choice_and_recorded_fallbacks():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = get_recipe("fp8-rowwise")
    assert auto.execution == "auto" and auto.runs_as("fwd", cpu) == "emulate"
    assert auto.runs_as("wgrad", cuda) == "scaled_mm" and not auto.fallbacks  # decided without touching a GPU
    mx = get_recipe("mxfp8")
    assert mx.runs_as("fwd", cuda) == "emulate" and "MX scales not wired" in mx.fallbacks["fwd"]
    # blockwise asked for on the CPU: emulated, the reason recorded and warned about, the numbers unchanged
    g = torch.Generator().manual_seed(4)
    x, w, dy = torch.randn(5, 200, generator=g), torch.randn(7, 200, generator=g), torch.randn(5, 7, generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block = get_recipe("fp8-blockwise:gemm=scaled_mm")
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = lowp_linear(xr, wr, block)
        y.backward(dy)
    assert set(block.fallbacks) == {"fwd", "dgrad", "wgrad"} and "1x128/128x128" in block.fallbacks["fwd"]
    assert len(caught) == 3 and "fwd GEMM emulated" in str(caught[0].message)
    for got, want in zip((y.detach(), xr.grad, wr.grad), linear_run("fp8-blockwise:gemm=emulate", x, w, dy)):
        assert torch.equal(got, want)


def test_gemm_option_parsing():
    assert EXECUTIONS == ("auto", "emulate", "scaled_mm")
    assert get_recipe("fp8-tensorwise:gemm=scaled_mm,keep=head+experts").execution == "scaled_mm"
    with pytest.raises(ValueError, match="gemm must be one of auto, emulate, scaled_mm, got 'fast'"):
        get_recipe("fp8-rowwise:gemm=fast")
    with pytest.raises(ValueError, match="mxfp8 has no FP8 GEMM for torch._scaled_mm"):
        get_recipe("mxfp8:gemm=scaled_mm")
    get_recipe("mxfp4-bwd:gemm=emulate")  # emulate and auto suit every recipe
    with pytest.raises(ValueError, match="keep=head, gemm=auto"):
        get_recipe("fp8-rowwise:fast=1")
    r = with_options(get_recipe("mxfp4-bwd:gemm=emulate"), sr=0)
    assert r.execution == "emulate" and r.options["sr"] == 0
    assert with_options(get_recipe("fp8-rowwise"), gemm="scaled_mm").execution == "scaled_mm"


def test_tiny_model_trains_under_gemm_scaled_mm():
    torch.manual_seed(0)
    cfg = {**MODEL_PRESETS["tiny"], "vocab_size": 64, "max_seq_len": 32, "dtype": "float32"}
    model = apply_precision(Transformer(ModelConfig(**cfg)), "fp8-rowwise:gemm=scaled_mm")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tok = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(5))
    tok[:, 1::2] = tok[:, 0:-1:2]  # every other token copies the previous one: learnable
    losses = []

    def step():
        loss = torch.nn.functional.cross_entropy(model(tok[:, :-1]).reshape(-1, 64), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    for _ in range(12):
        step()
    recipe = model.layers[0].attn.q_proj.recipe
    assert all(recipe.runs_as(role, torch.device("cpu")) == "scaled_mm" for role in ("fwd", "dgrad", "wgrad"))
    assert not recipe.fallbacks  # every GEMM ran as torch._scaled_mm (the product tests count the calls)
    assert losses[-1] < losses[0] - 0.8, losses


def test_train_cli_bad_gemm_lists_the_valid_ones(tmp_path):
    moekit = str(Path(sys.executable).parent / "moekit")
    done = subprocess.run([moekit, "train", "--preset", "tiny", "--precision", "fp8-rowwise:gemm=fast",
                           "--out", tmp_path / "run"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "moekit train: error:" in lines[0] and "auto, emulate, scaled_mm" in lines[0]


@pytest.mark.slow
def test_train_cli_runs_under_gemm_scaled_mm(corpus, tmp_path):
    moekit = str(Path(sys.executable).parent / "moekit")
    done = subprocess.run([moekit, "train", "--preset", "tiny", "--corpus", corpus, "--cache-dir", tmp_path / "c",
                           "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300", "--val-fraction", "0.1",
                           "--eval-batches", "1", "--warmup-steps", "1", "--max-steps", "3", "--eval-every", "3",
                           "--precision", "fp8-rowwise:gemm=scaled_mm", "--out", tmp_path / "run"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("name", SCALED + ("fp8-blockwise",))
def test_cuda_scaled_mm_equals_the_emulation(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(6)
    M, K, N = 300, 520, 264  # off the 128 grid: padded
    x, w = torch.randn(M, K, device="cuda", generator=g), torch.randn(N, K, device="cuda", generator=g)
    dy = torch.randn(M, N, device="cuda", generator=g)
    recipe = get_recipe(f"{name}:gemm=scaled_mm")
    scaled = linear_run(f"{name}:gemm=scaled_mm", x, w, dy)
    if recipe.runs_as("fwd", x.device) == "emulate":
        pytest.skip(recipe.fallbacks["fwd"])
    for got, want in zip(scaled, linear_run(f"{name}:gemm=emulate", x, w, dy)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), name
