"""The C matvec over q8_0 / q4_0 / mxfp4 blocks and float32 weights (moekit/cpu_matvec.c) against the float
reference x @ Format.dequantize(W)ᵀ: its AVX-512 and AVX2 paths (where the CPU has them) and its portable C
path (built with both disabled), a Linear's rows, gathered experts' pairs (quantized and float32), batch
invariance, the compiled decode that calls it, and the switch that turns it off."""

import os
import subprocess
import sys

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.generate import generate
from moekit import cpu_matvec
from moekit.quantize import quantize_model
from moekit.quantize.modules import QuantizedWeight

pytestmark = pytest.mark.skipif(not cpu_matvec.available(), reason=f"no CPU kernel: {cpu_matvec.error()}")

METHODS = ("q8_0", "q4_0", "mxfp4")


def reference(qw: QuantizedWeight, x_RK, index_R=None):
    if index_R is None:
        return x_RK.double() @ qw.dense().double().t()
    return torch.stack([x_RK[r].double() @ qw.dense(int(e)).double().t() for r, e in enumerate(index_R)])


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """The kernel as loaded, and built without AVX-512 (the AVX2 paths where the CPU has AVX2) and without AVX2
    either (the portable C): each path on any machine that has the instructions (built once for the module)."""
    tmp = tmp_path_factory.mktemp("kernels")
    return {"native": cpu_matvec.library(),
            "avx2": cpu_matvec.load(cpu_matvec.build(["-mno-avx512f"], cache_dir=tmp / "avx2")),
            "portable": cpu_matvec.load(cpu_matvec.build(["-mno-avx512f", "-mno-avx2"], cache_dir=tmp / "c"))}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [32, 96, 100])  # 100: rows padded to whole blocks of 32
def test_linear_rows_match_the_dequantized_reference(method, K, builds):
    torch.manual_seed(0)
    qw = QuantizedWeight.from_float(torch.randn(70, K), method)
    libs = builds
    for R in (1, 3, 8, 11):  # 11: one full tile of 8 rows and one of 3
        x_RK = torch.randn(R, K)
        ref = reference(qw, x_RK).float()
        for name, lib in libs.items():
            x_pad = qw_format_pad(qw, x_RK)
            y = cpu_matvec.call(lib, method, x_pad, qw.qweight, qw.kernel_scale, None)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4, msg=f"{name} R={R}")
        torch.testing.assert_close(qw.kernel_matvec(x_RK, None), ref, rtol=1e-5, atol=1e-4)


def qw_format_pad(qw, x_RK):
    from moekit.quantize import formats

    return formats.get_format(qw.method).pad(x_RK)


@pytest.mark.parametrize("method", METHODS)
def test_gathered_pairs_match_the_reference_and_share_an_expert_bitwise(method, builds):
    torch.manual_seed(1)
    qw = QuantizedWeight.from_float(torch.randn(6, 40, 64), method)  # 6 experts (N=40, K=64)
    index_P = torch.tensor([3, 0, 3, 5, 3, 3, 1, 3, 3, 3, 3, 3])  # expert 3: 9 pairs, more than one tile
    x_PK = torch.randn(len(index_P), 64)
    ref = reference(qw, x_PK, index_P).float()
    for lib in builds.values():
        y_PN = cpu_matvec.call(lib, method, x_PK, qw.qweight, qw.kernel_scale, index_P)
        torch.testing.assert_close(y_PN, ref, rtol=1e-5, atol=1e-4)
        for p in range(len(index_P)):  # a pair alone gives the same bits as among the others
            alone = cpu_matvec.call(lib, method, x_PK[p:p + 1], qw.qweight, qw.kernel_scale, index_P[p:p + 1])
            assert torch.equal(alone[0], y_PN[p])
    via_weight = qw.gathered_matvec(index_P, x_PK[:, None, :])  # 12 pairs > MAX_ROWS_SHARED: the kernel
    assert torch.equal(via_weight, cpu_matvec.call(cpu_matvec.library(), method, x_PK, qw.qweight,
                                                   qw.kernel_scale, index_P))


@pytest.mark.parametrize("method", METHODS)
def test_a_row_is_bitwise_the_same_alone_or_in_a_tile(method):
    torch.manual_seed(2)
    qw = QuantizedWeight.from_float(torch.randn(50, 128), method)
    x_RK = torch.randn(8, 128)
    together = qw.kernel_matvec(x_RK, None)
    for r in range(8):
        assert torch.equal(qw.kernel_matvec(x_RK[r:r + 1], None)[0], together[r])


@pytest.mark.parametrize("method", METHODS)
def test_compiled_batched_decode_through_the_kernel_equals_eager(method):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # no near-ties between the top two logits
    model = quantize_model(model.eval(), method, quantize_head=True)
    prompts = [[5, 17, 300, 42], [8, 3], [11, 12, 13]]  # 3 rows: the compiled Linears call the kernel
    eager = generate(model, prompts, max_new_tokens=6)
    assert generate(model, prompts, max_new_tokens=6, compile=True) == eager


def test_disabled_by_the_environment_variable():
    code = ("import torch; from moekit import cpu_matvec; from moekit.quantize.modules import "
            "QuantizedWeight; QuantizedWeight.from_float(torch.randn(4, 32), 'q8_0'); "
            "print(cpu_matvec.available(), cpu_matvec.error())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MOEKIT_CPU_KERNEL": "0"}).stdout
    assert out.strip() == "False disabled by MOEKIT_CPU_KERNEL=0"


@pytest.mark.parametrize("K", [96, 1024])  # 1024: rows 4 KiB apart, where tiles of several rows read a copy
def test_float32_experts_pairs_match_the_reference_bitwise_alone(builds, K):
    """f32: the expert weights as they are (no scales); moe.weights.gathered_matvec takes the kernel for
    more than MAX_ROWS_SHARED pairs and keeps the torch reduction for fewer. A pair alone (one row, read in
    place) gets the bits it gets in a tile of 8 (K=1024: through the copied weight block)."""
    from moekit.moe.weights import gathered_matvec

    torch.manual_seed(3)
    w_ENK = torch.randn(5, 21, K)  # (21: 16 outputs and a tile of 5)
    index_P = torch.tensor([1, 4, 1, 1, 0, 1, 1, 1, 1, 1, 2])
    x_PK = torch.randn(len(index_P), K)
    ref = torch.stack([w_ENK[e].double() @ x_PK[p].double() for p, e in enumerate(index_P)]).float()
    for lib in builds.values():
        y_PN = cpu_matvec.call(lib, "f32", x_PK, w_ENK, None, index_P)
        torch.testing.assert_close(y_PN, ref, rtol=1e-5, atol=1e-5)
        for p in range(len(index_P)):
            assert torch.equal(cpu_matvec.call(lib, "f32", x_PK[p:p + 1], w_ENK, None, index_P[p:p + 1])[0], y_PN[p])
    assert torch.equal(gathered_matvec(w_ENK, index_P, x_PK[:, None]),
                       cpu_matvec.call(cpu_matvec.library(), "f32", x_PK, w_ENK, None, index_P))
    few = gathered_matvec(w_ENK, index_P[:4], x_PK[:4, None])  # 4 pairs: the torch reduction
    torch.testing.assert_close(few, ref[:4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [96, 1024])
def test_rowwise_projection_takes_the_kernel_a_row_alone_or_in_a_batch(K):
    """`Numerics.rowwise_linears` (the engine's decode step): a plain float32 nn.Linear multiplies through
    the f32 kernel, so a row gets the same bits alone and among 7 others (a GEMM's order follows the row
    count); plain numerics keep the module's forward; a training forward (grad) keeps F.linear."""
    from moekit.moe.weights import project
    from moekit.numerics import PLAIN, Numerics

    torch.manual_seed(4)
    layer = torch.nn.Linear(K, 40)
    rowwise = Numerics(rowwise_linears=True)
    x_BTK = torch.randn(8, 1, K)
    ref = (x_BTK.double() @ layer.weight.double().t() + layer.bias.double()).float()
    with torch.no_grad():
        y_BTN = project(layer, x_BTK, rowwise)
        torch.testing.assert_close(y_BTN, ref, rtol=1e-5, atol=1e-5)
        kernel_BN = cpu_matvec.call(cpu_matvec.library(), "f32", x_BTK[:, 0], layer.weight, None, None)
        assert torch.equal(y_BTN[:, 0], kernel_BN + layer.bias)
        for b in range(8):
            assert torch.equal(project(layer, x_BTK[b:b + 1], rowwise), y_BTN[b:b + 1])
        assert torch.equal(project(layer, x_BTK, PLAIN), layer(x_BTK))
    y = project(layer, x_BTK, rowwise)
    assert y.requires_grad and torch.equal(y, layer(x_BTK))


def test_project_all_is_one_call_with_each_projections_bits():
    """Projections of one input (attention's q, k, v) under the decode numerics: one C call (f32matvec_cat) whose
    results are bitwise those of `project` one module at a time, biases included; plain numerics, a training
    forward or a module that is not a plain nn.Linear keep one `project` each."""
    from moekit.moe.weights import project, project_all
    from moekit.numerics import PLAIN, Numerics

    torch.manual_seed(6)
    modules = (torch.nn.Linear(64, 48), torch.nn.Linear(64, 16, bias=False), torch.nn.Linear(64, 16))
    rowwise = Numerics(rowwise_linears=True)
    x_BTK = torch.randn(3, 1, 64)
    calls = []
    original = cpu_matvec.f32matvec_cat
    cpu_matvec.f32matvec_cat = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad():
            for numerics, fused in ((rowwise, True), (PLAIN, False)):
                calls.clear()
                ys = project_all(modules, x_BTK, numerics)
                assert len(calls) == int(fused)
                for y, m in zip(ys, modules):
                    assert y.shape == (3, 1, m.out_features) and torch.equal(y, project(m, x_BTK, numerics))
            calls.clear()
            mixed = (modules[0], torch.nn.Sequential(modules[1]))
            ys = project_all(mixed, x_BTK, rowwise)
            assert all(torch.equal(y, project(m, x_BTK, rowwise)) for y, m in zip(ys, mixed))
            assert not calls
        ys = project_all(modules, x_BTK, rowwise)  # grad enabled: F.linear
        assert not calls and all(torch.equal(y, m(x_BTK)) for y, m in zip(ys, modules))
    finally:
        cpu_matvec.f32matvec_cat = original


def test_decode_step_multiplies_the_head_for_the_active_rows_only():
    """Under the engine's decode numerics the head computes rows alone (moe/weights.rows_alone), so the static
    step multiplies only the active rows: a row's logits are bitwise those it gets among all rows active;
    plain numerics (a GEMM) multiply every row, then pick."""
    from dataclasses import replace

    from moekit.moe.weights import rows_alone
    from moekit.numerics import PLAIN, batch_invariant

    decode = replace(batch_invariant(), rowwise_linears=True)
    torch.manual_seed(5)
    model = Transformer(ModelConfig.preset("tiny", d_model=64)).eval()
    h_BD = torch.randn(4, 64)
    cpu_matvec.prepare("f32", "cpu")
    with torch.no_grad():  # (a training forward keeps F.linear)
        assert rows_alone(model.lm_head, h_BD, decode) and not rows_alone(model.lm_head, h_BD, PLAIN)
    assert not rows_alone(model.lm_head, h_BD, decode)
    ids = torch.randint(5, 200, (4, 6))
    step = torch.tensor([[7], [8], [9], [10]])
    slots = torch.full((4,), 6)

    def logits(rows, numerics):
        cache = model.new_cache(4, 16)
        with torch.no_grad():
            model(ids, cache=cache, start=0)
            return model.decode_step(step, slots[:, None], slots, torch.ones(4, 16, dtype=torch.bool), cache,
                                     numerics, static=True, active_rows=torch.tensor(rows))

    every = logits([0, 1, 2, 3], decode)
    assert every.shape == (4, model.cfg.vocab_size)
    assert torch.equal(logits([2], decode)[0], every[2]) and torch.equal(logits([1, 3], decode), every[[1, 3]])
    torch.testing.assert_close(logits([1, 3], PLAIN), every[[1, 3]], rtol=1e-4, atol=1e-4)


def test_sizes_and_indices_that_do_not_fit_are_refused():
    """The C code trusts its sizes; `call` refuses what would make it read out of bounds."""
    lib = cpu_matvec.library()
    qw = QuantizedWeight.from_float(torch.randn(3, 16, 64), "q4_0")  # 3 experts (N=16, K=64)
    x_RK = torch.randn(2, 64)
    with pytest.raises(IndexError, match="outside"):
        cpu_matvec.call(lib, "q4_0", x_RK, qw.qweight, qw.kernel_scale, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="does not fit"):
        cpu_matvec.call(lib, "q4_0", torch.randn(2, 96), qw.qweight, qw.kernel_scale, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index"):
        cpu_matvec.call(lib, "q4_0", x_RK, qw.qweight, qw.kernel_scale, None)
    with pytest.raises(ValueError, match="scales"):
        cpu_matvec.call(lib, "q8_0", x_RK, QuantizedWeight.from_float(torch.randn(16, 64), "q8_0").qweight, None,
                        None)
    mx = QuantizedWeight.from_float(torch.randn(16, 64), "mxfp4")
    with pytest.raises(ValueError, match="uint8 E8M0 scales"):  # mxfp4 reads its E8M0 bytes, not floats
        cpu_matvec.call(lib, "mxfp4", x_RK, mx.qweight, mx.scale.float(), None)


def test_mxfp4_scales_are_read_from_their_e8m0_bytes_at_the_ends_of_the_range(builds):
    """The kernel builds 2**(s - 127) from each E8M0 byte (no float32 copy): s = 0 (subnormal 2**-127), 1, 127,
    254 (6 * 2**127 overflows to inf, so a row's sum is NaN as in x @ Wᵀ) and 255 (NaN) give the dequantized
    weight's products exactly (x one-hot: y is one product, no rounding of a sum)."""
    qw = QuantizedWeight.from_float(torch.randn(5, 64), "mxfp4")
    qw.scale[:, 0] = torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8)
    x_RK = torch.zeros(2, 64)
    x_RK[0, 1], x_RK[1, 0] = 1.0, 1.0  # (element 1: a high nibble; element 0: a low one)
    expected = (x_RK.double() @ qw.dense().double().t()).float()
    assert torch.isnan(expected[:, 4]).all() and torch.isfinite(expected[:, :3]).all()
    for lib in builds.values():
        y = cpu_matvec.call(lib, "mxfp4", x_RK, qw.qweight, qw.kernel_scale, None)
        torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("method", (*METHODS, "f32"))
def test_rows_of_zeros_give_zeros_and_leave_the_other_rows_bitwise_alone(method, builds):
    """A row of x that is all zeros (+0 or -0: the engine's padding rows) reads no weight and gets zeros; the other
    rows, pairs of stacked experts included, keep the bits they get alone, in both builds."""
    torch.manual_seed(5)
    K, N, E = 96, 40, 3
    if method == "f32":
        w, scale = torch.randn(E, N, K), None
    else:
        qw = QuantizedWeight.from_float(torch.randn(E, N, K), method)
        w, scale = qw.qweight, qw.kernel_scale
    x_RK = torch.randn(7, K)
    x_RK[[1, 4]] = 0.0
    x_RK[5] = -0.0
    index_R = torch.tensor([0, 2, 2, 1, 2, 2, 0])
    for lib in builds.values():
        y_RN = cpu_matvec.call(lib, method, x_RK, w, scale, index_R)
        for r in range(7):
            alone = cpu_matvec.call(lib, method, x_RK[r:r + 1], w, scale, index_R[r:r + 1])
            assert torch.equal(y_RN[r], alone[0]), r
            if r in (1, 4, 5):
                assert torch.equal(y_RN[r], torch.zeros(N)), r
        dense_ENK = w if method == "f32" else torch.stack([qw.dense(e) for e in range(E)])
        ref_RN = torch.stack([x_RK[r].double() @ dense_ENK[int(index_R[r])].double().t() for r in range(7)])
        torch.testing.assert_close(y_RN.double(), ref_RN, rtol=1e-5, atol=1e-4)


def test_a_row_of_zeros_reads_no_weight():
    """The skip itself: against a weight holding inf, a computed row sums to inf/NaN (as x @ Wᵀ does), a row of
    zeros gets zeros (0 * inf would be NaN), so the kernel never read the weight for it."""
    w_NK = torch.randn(16, 64)
    w_NK[3, 5] = float("inf")
    x_RK = torch.randn(2, 64)
    x_RK[1] = 0.0
    y_RN = cpu_matvec.call(cpu_matvec.library(), "f32", x_RK, w_NK, None, None)
    assert not torch.isfinite(y_RN[0, 3]) and torch.equal(y_RN[1], torch.zeros(16))
