"""Low-precision recipes (moekit.lowp): the random Hadamard transform, quantised linear gradients against
fp32 (within the format's error; unbiased under SR), the routed experts' GEMMs under a recipe (layout-
independent, memory contract kept), every recipe training the tiny model, and `moekit train --precision`."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.bench.memory import saved_bytes
from moekit.lowp.hadamard import hadamard_matrix, random_signs, rht
from moekit.lowp.matmul import lowp_linear
from moekit.lowp.recipes import PRECISIONS, RECIPES, get_recipe
from moekit.lowp.transform import LowpLinear, LowpSwiGLU, apply_precision, remove_precision
from moekit.moe.grouped import experts_grouped
from moekit.presets import MODEL_PRESETS

MOEKIT = str(Path(sys.executable).parent / "moekit")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The emulation runs many small ops: on a shared 2-core machine a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_rht_is_orthogonal_and_keeps_the_product(block):
    signs = random_signs(block, torch.Generator().manual_seed(0))
    q = signs[:, None] * hadamard_matrix(block)
    assert torch.allclose(q @ q.T, torch.eye(block), atol=1e-6)
    a, b = torch.randn(48, 200, dtype=torch.float64), torch.randn(40, 200, dtype=torch.float64)  # 200: padded
    ra, rb = rht(a, signs, block), rht(b, signs, block)
    assert ra.shape[-1] % block == 0 and not torch.allclose(ra[:, :200], a.float(), atol=0.1)
    assert torch.allclose(ra @ rb.T, (a @ b.T).float(), rtol=1e-4, atol=1e-4)


def test_sr_with_rht_has_lower_variance_than_sr_alone_on_outliers():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)
    a[torch.rand(a.shape, generator=g) < 1 / 64] *= 50.0  # sparse outliers in both operands: the rest of their
    b[torch.rand(b.shape, generator=g) < 1 / 64] *= 50.0  # MX block rounds to almost nothing without the RHT
    exact = (a.double() @ b.double().T)
    err = {}
    for rht_on in (0, 1):
        recipe = get_recipe(f"mxfp4-bwd:sr=1,rht={rht_on}")
        sq = [((lambda q: q[0].double() @ q[1].double().T)(recipe.operands("wgrad", a, b, g)) - exact).pow(2).mean()
              for _ in range(20)]
        err[rht_on] = torch.stack(sq).mean().item()
    assert err[1] < 0.5 * err[0], err  # the theorem: RHT bounds the SR variance by the block's spread


def unit_magnitudes(*shape, g):
    """Random signs, magnitudes in [0.5, 1]: every value stays normal after any of the recipes' scales."""
    return (torch.rand(*shape, generator=g) * 0.5 + 0.5) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)


# per-element relative error of round-to-nearest on values within a factor 2 of their group's max:
# FP8 E4M3 2^-4, E5M2 2^-3; MXFP8 (E4M3 elements, amax/scale in [256, 512) saturates at 448) 1/8; MXFP4 1/4.
# (a, b) of the fwd, dgrad and wgrad GEMMs
E4, E5, MX8, MX4 = 2 ** -4, 2 ** -3, 1 / 8, 1 / 4
REL_ERR = {"fp8-tensorwise": [(E4, E4), (E5, E4), (E5, E4)], "fp8-rowwise": [(E4, E4)] * 3,
           "fp8-blockwise": [(E4, E4)] * 3, "mxfp8": [(MX8, MX8)] * 3, "mxfp4-bwd:sr=0,rht=0": [(0, 0), (MX4, MX4), (MX4, MX4)]}


@pytest.mark.parametrize("spec", REL_ERR)
def test_quantised_linear_grads_within_the_format_error(spec):
    g = torch.Generator().manual_seed(2)
    x, w, dy = unit_magnitudes(96, 160, g=g), unit_magnitudes(80, 160, g=g), unit_magnitudes(96, 80, g=g)
    x.requires_grad_(True), w.requires_grad_(True)
    y = lowp_linear(x, w, get_recipe(spec))
    y.backward(dy)
    # |Q(a)Q(b)ᵀ - abᵀ| <= (u_a + u_b + u_a u_b) |a||b|ᵀ elementwise
    gemms = [(y, x, w), (x.grad, dy, w.T), (w.grad, dy.T, x.T)]
    for (got, a, b), (ua, ub) in zip(gemms, REL_ERR[spec]):
        bound = (ua + ub + ua * ub) * (a.abs() @ b.abs().T).detach() + 1e-5
        exact = (a @ b.T).detach()
        assert ((got - exact).abs() <= bound).all(), spec
        assert torch.equal(got, exact) == (ua == ub == 0)  # quantised exactly where the recipe says


def test_sr_gradients_are_unbiased_and_nearest_ones_are_not():
    g = torch.Generator().manual_seed(3)
    x, w, dy = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(32, 48, generator=g)
    exact_dx, exact_dw = dy @ w, dy.T @ x

    def grads(spec, n):
        dxs, dws = [], []
        for _ in range(n):
            xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            lowp_linear(xr, wr, get_recipe(spec)).backward(dy)
            dxs.append(xr.grad.double()), dws.append(wr.grad.double())
        return torch.stack(dxs), torch.stack(dws)

    n = 150
    for spec in ("mxfp4-bwd", "mxfp4-bwd:rht=0"):  # SR with and without the RHT
        dxs, dws = grads(spec, n)
        for samples, exact in ((dxs, exact_dx), (dws, exact_dw)):
            one = (samples[0] - exact).norm()
            # unbiased: the mean's error shrinks like 1/sqrt(n) (4x margin)
            assert (samples.mean(0) - exact).norm() < 4 * one / math.sqrt(n), spec
    dxs, dws = grads("mxfp4-bwd:sr=0,rht=0", 2)
    assert torch.equal(dxs[0], dxs[1])  # deterministic, so its error never averages out
    assert (dxs[0] - exact_dx).norm() > 0.05 * exact_dx.norm()


def expert_problem(seed=4, T=96, D=64, F=32, E=4, K=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    w13 = (torch.randn(E, 2 * F, D, generator=g) / 8).requires_grad_(True)
    w2 = (torch.randn(E, D, F, generator=g) / 6).requires_grad_(True)
    gates = torch.rand(T * K, generator=g, requires_grad=True)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).reshape(-1)
    return x, w13, w2, gates, tok, exp


def run_experts(problem, layout, gemm):
    x, w13, w2, gates, tok, exp = problem
    for t in (x, w13, w2, gates):
        t.grad = None
    out = experts_grouped(x, w13, w2, gates, tok, exp, layout, gemm=gemm)
    out.backward(torch.ones_like(out))
    return [out.detach()] + [t.grad.clone() for t in (x, w13, w2, gates)]


@pytest.mark.parametrize("spec", ["fp8-rowwise", "mxfp8", "mxfp4-bwd:sr=0,rht=0"])
def test_expert_gemms_under_a_recipe_are_layout_independent_and_close(spec):
    problem = expert_problem()
    exact = run_experts(problem, "compact", None)
    results = [run_experts(problem, layout, get_recipe(spec)) for layout in ("compact", "padded", 40)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    tol = 0.3 if spec.startswith("mxfp4") else 0.1
    for got, want in zip(results[0], exact):
        assert 0 < (got - want).norm() / want.norm() < tol or (spec.startswith("mxfp4") and got is results[0][0])


def test_expert_gemms_under_a_recipe_keep_the_memory_contract():
    x, w13, w2, gates, tok, exp = expert_problem(T=256)
    plain, _ = saved_bytes(lambda: experts_grouped(x, w13, w2, gates, tok, exp, "compact"), params=(w13, w2))
    for spec in ("fp8-blockwise", "mxfp4-bwd"):
        lowp, _ = saved_bytes(lambda: experts_grouped(x, w13, w2, gates, tok, exp, "compact", gemm=get_recipe(spec)),
                              params=(w13, w2))
        assert lowp == plain  # X, H, the gates and the integer sort, in the compute dtype: nothing more


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = {**MODEL_PRESETS["tiny"], "vocab_size": 64, "max_seq_len": 32, "dtype": "float32"}
    cfg["moe"] = {**cfg["moe"], "num_shared_experts": 1}
    return Transformer(ModelConfig(**cfg))


@pytest.mark.parametrize("spec", PRECISIONS[1:] + ("mxfp4-bwd:sr=0,rht=0",))
def test_every_recipe_trains_the_tiny_model(spec):
    model = apply_precision(tiny_model(), spec)
    kinds = {type(m) for m in model.modules()}
    assert LowpLinear in kinds and LowpSwiGLU in kinds and model.layers[1].ffn.experts.gemm is not None
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in high precision by default
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 64, (8, 33), generator=g)
    tok[:, 1::2] = tok[:, 0:-1:2]  # every other token copies the previous one: learnable
    losses = []
    for _ in range(12):
        logits = model(tok[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64).float(), tok[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.8, losses


def test_transform_keeps_parameters_and_can_be_undone():
    model = tiny_model()
    before = dict(model.named_parameters())
    apply_precision(model, "fp8-blockwise:keep=experts")
    assert dict(model.named_parameters()) == before  # same names, same Parameter objects
    assert model.layers[1].ffn.experts.gemm is None and isinstance(model.layers[0].attn.q_proj, LowpLinear)
    with pytest.raises(ValueError, match="already runs under"):
        apply_precision(model, "mxfp8")
    remove_precision(model)
    assert not any(isinstance(m, (LowpLinear, LowpSwiGLU)) for m in model.modules())


@pytest.mark.parametrize("spec,message", [("fp9", "choose one of none, fp8-tensorwise"),
                                          ("mxfp4-bwd:sr=2", "sr must be 0 or 1"),
                                          ("mxfp4-bwd:foo=1", "mxfp4-bwd takes sr=1, rht=1, rht_block=64"),
                                          ("mxfp8:keep=router", "unknown part 'router'"),
                                          ("mxfp4-bwd:rht_block=48", "power of two")])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        get_recipe(spec)


def test_recipe_table():
    assert PRECISIONS == ("none", "fp8-tensorwise", "fp8-rowwise", "fp8-blockwise", "mxfp8", "mxfp4-bwd")
    r = get_recipe("mxfp4-bwd")
    assert not r.fwd.quantized and r.dgrad.rht and r.wgrad.a.rounding == "stochastic" and r.wgrad.a.elem == "e2m1"
    b = get_recipe("fp8-blockwise")
    assert (b.fwd.a.scaling, b.fwd.b.scaling, b.wgrad.b.scaling) == ("tile", "block", "tile")
    assert set(RECIPES) == set(PRECISIONS[1:])


def moekit(*args):
    return subprocess.run([MOEKIT, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_train_cli_bad_precision_lists_the_valid_names(tmp_path):
    done = moekit("train", "--preset", "tiny", "--precision", "fp4", "--out", tmp_path / "run")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "moekit train: error:" in lines[0]
    for name in PRECISIONS:
        assert name in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_cli_precision_is_saved_and_kept_on_resume(corpus, tmp_path):
    common = ["--preset", "tiny", "--corpus", corpus, "--cache-dir", tmp_path / "cache", "--seq-len", "32",
              "--batch-size", "4", "--vocab-size", "300", "--val-fraction", "0.1", "--eval-batches", "1",
              "--warmup-steps", "1", "--out", tmp_path / "run"]
    done = moekit("train", *common, "--max-steps", 2, "--eval-every", 2, "--precision", "mxfp4-bwd:sr=0")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == "mxfp4-bwd:sr=0"
    done = moekit("train", "--out", tmp_path / "run", "--resume", "--max-steps", 3, "--new-decay")
    assert done.returncode == 0, done.stderr
    assert "precision: mxfp4-bwd:sr=0" in done.stdout
    refused = moekit("train", "--out", tmp_path / "run", "--resume", "--max-steps", 4, "--new-decay",
                     "--precision", "mxfp8")
    assert refused.returncode == 2 and "precision" in refused.stderr


def test_analyzer_lowp_throughput_hand_worked():
    from moekit.analyze.catalog import resolve_model
    from moekit.analyze.lowp import lowp_rows
    from moekit.analyze.params import params_by_component

    arch = resolve_model("deepseek-v3")
    active = params_by_component(arch, active=True)
    f = (active["attention"] + active["dense_ffn"] + active["shared_experts"] + active["experts"]) / sum(active.values())
    rows = {r["precision"]: r for r in lowp_rows(arch, "h100")}
    # all three GEMMs at 1979 TFLOPS on a fraction f of the work, the rest at 989
    assert rows["fp8-blockwise"]["speedup"] == pytest.approx(1 / (f * 989 / 1979 + 1 - f))
    # mxfp4-bwd: forward bf16; the H100 has no FP4 units, so dgrad and wgrad run at the FP8 peak
    assert rows["mxfp4-bwd"]["speedup"] == pytest.approx(3 / (1 + 2 * (f * 989 / 1979 + 1 - f)))
    assert rows["mxfp8"]["weight_bits"] == 8.25 and rows["mxfp4-bwd"]["grad_bits"] == 4.25
    b200 = {r["precision"]: r for r in lowp_rows(arch, "b200")}
    assert b200["mxfp4-bwd"]["gemms"]["dgrad"] == "fp4"
    bad = moekit("analyze", "tiny", "--precision", "fp9")
    assert bad.returncode == 2 and "choose one of none, fp8-tensorwise" in bad.stderr
