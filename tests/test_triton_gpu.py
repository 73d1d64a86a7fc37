"""CUDA checks of the compiled Triton backend (marked gpu: skipped without a GPU, not in the fast tier).

The same routing grid as test_triton_backend.py at realistic sizes, in bfloat16 and
float32: err(triton) <= 2 * err(reference in that dtype) + atol against the float64
reference; the saved-bytes contract; torch.compile(fullgraph=True) over a whole MoE
layer. Run in a process where TRITON_INTERPRET is unset (the kernels' mode is fixed
when moekit.moe.triton is first imported):  pytest -m gpu tests/test_triton_gpu.py
"""

import copy
import os

import pytest
import torch

from moekit.bench.memory import saved_bytes

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from moekit.moe import MoE, MoEConfig  # noqa: E402
from moekit.moe.reference import experts_reference  # noqa: E402
from moekit.moe.rounding import round_selection  # noqa: E402

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def triton_fn():
    """experts_triton, imported lazily (so collection on a CPU machine defines no kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: run the GPU tests in a process without it")
    from moekit.moe.triton import common
    from moekit.moe.triton.function import experts_triton

    if common.INTERPRET:
        pytest.skip("moekit's triton kernels were imported in interpreter mode in this process")
    return experts_triton


def make_routing(T, E, K, kind, gen):
    if kind == "rounded":  # token rounding to the GEMM tile (128): every segment a multiple of 128
        scores_TE = torch.rand(T, E, generator=gen)
        mask_TE = round_selection(scores_TE, scores_TE.topk(K, dim=1).indices, 128, "nearest")
        return mask_TE.nonzero(as_tuple=True)
    pool = E - 1 if kind == "zero_expert" else E
    exp_TK = torch.stack([torch.randperm(pool, generator=gen)[:K] for _ in range(T)])
    if kind == "one_expert":
        exp_TK = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(E - 1, generator=gen)[: K - 1] + 1])
                              for _ in range(T)])
    tok, exp = torch.arange(T).repeat_interleave(K), exp_TK.reshape(-1)
    if kind == "shuffled":
        perm = torch.randperm(tok.numel(), generator=gen)
        tok, exp = tok[perm], exp[perm]
    return tok, exp


# (T, D, F, E, K, kind)
CASES = [
    (1, 256, 128, 8, 2, "random"),
    (384, 256, 96, 16, 16, "random"),  # K = E
    (1000, 520, 200, 8, 2, "zero_expert"),  # dims not multiples of any tile
    (777, 384, 256, 8, 1, "one_expert"),
    (500, 256, 128, 8, 4, "one_expert"),
    (2048, 512, 256, 16, 4, "rounded"),
    (1024, 1536, 256, 32, 8, "shuffled"),
]


def make_inputs(T, D, F, E, K, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tok, exp = make_routing(T, E, K, kind, gen)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w13 = torch.randn(E, 2 * F, D, generator=gen, dtype=torch.float64) * D**-0.5
    w2 = torch.randn(E, D, F, generator=gen, dtype=torch.float64) * F**-0.5
    gates = torch.rand(tok.numel(), generator=gen, dtype=torch.float64)
    dout = torch.randn(T, D, generator=gen, dtype=torch.float64)
    cuda = lambda t: t.to("cuda")  # noqa: E731
    return [cuda(t) for t in (x, w13, w2, gates)], cuda(tok), cuda(exp), cuda(dout)


def run_fn(fn, tensors, tok, exp, dout, dtype):
    gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.to(dtype if i < 3 else gate_dtype).clone().requires_grad_(True) for i, t in enumerate(tensors)]
    y = fn(*leaves, tok, exp)
    (y * dout.to(dtype)).sum().backward()
    return [y.detach()] + [leaf.grad for leaf in leaves]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference_on_cuda(triton_fn, case, dtype):
    tensors, tok, exp, dout = make_inputs(*case)
    ref64 = run_fn(experts_reference, tensors, tok, exp, dout, torch.float64)
    ref = run_fn(experts_reference, tensors, tok, exp, dout, dtype)
    new = run_fn(triton_fn, tensors, tok, exp, dout, dtype)
    for name, n, r, r64 in zip(["y", "x", "w13", "w2", "gates"], new, ref, ref64):
        assert n.dtype == r.dtype, name
        e_new, e_ref = rel_err(n, r64), rel_err(r, r64)
        assert e_new <= 2 * e_ref + ATOL[dtype], f"{case} {name}: triton err {e_new:.2e} vs reference err {e_ref:.2e}"


@pytest.mark.parametrize("T,D,F,E,K", [(4096, 1536, 256, 128, 8), (4096, 1024, 512, 32, 2)])
def test_saved_bytes_contract_on_cuda(triton_fn, T, D, F, E, K):
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=dt, requires_grad=True)
    w13 = torch.randn(E, 2 * F, D, device=dev, dtype=dt, requires_grad=True)
    w2 = torch.randn(E, D, F, device=dev, dtype=dt, requires_grad=True)
    gates = torch.rand(T * K, device=dev, requires_grad=True)
    tok = torch.arange(T, device=dev).repeat_interleave(K)
    exp = torch.rand(T, E, device=dev).topk(K, dim=1).indices.reshape(-1)
    nbytes, y = saved_bytes(lambda: triton_fn(x, w13, w2, gates, tok, exp), params=(w13, w2))
    x_bytes, h_bytes = T * D * 2, T * K * 2 * F * 2
    assert x_bytes + h_bytes <= nbytes <= 1.1 * (x_bytes + h_bytes) + 64 * T * K
    y.float().square().sum().backward()  # backward runs with only that
    assert torch.isfinite(x.grad).all() and torch.isfinite(w13.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_compiled_layer_fullgraph_on_cuda(triton_fn, dtype):
    cfg = MoEConfig(d_model=256, d_expert=128, num_experts=16, top_k=4, experts_impl="triton", num_shared_experts=1)
    moe = MoE(cfg).to("cuda", dtype)
    x = torch.randn(4, 128, 256, device="cuda", dtype=dtype)
    g = torch.randn_like(x)

    def step(module, fn):
        xi = x.clone().requires_grad_(True)
        y, aux = fn(xi)
        ((y * g).sum() + aux.loss).backward()
        return y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}

    eager = copy.deepcopy(moe)
    y_e, dx_e, gr_e = step(eager, eager)
    compiled = copy.deepcopy(moe)
    torch._dynamo.reset()
    y_c, dx_c, gr_c = step(compiled, torch.compile(compiled, fullgraph=True))
    # relative Frobenius error: robust to a rare top-k near-tie flipping between eager and compiled
    bound = 3e-2 if dtype == torch.bfloat16 else 1e-4
    fro = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()  # noqa: E731
    assert fro(y_c, y_e) < bound
    assert fro(dx_c, dx_e) < bound
    for name in gr_e:
        assert fro(gr_c[name], gr_e[name]) < bound, name


def test_layer_with_token_rounding_on_cuda(triton_fn):
    """Token rounding to the 128-row tile: every expert segment is whole tiles."""
    cfg = MoEConfig(d_model=512, d_expert=256, num_experts=16, top_k=4, token_rounding="up", rounding_tile=128)
    moe64 = MoE(cfg).to("cuda", torch.float64)
    x = torch.randn(2048, 512, device="cuda", dtype=torch.float64)

    def run(moe, impl, dtype):
        moe = copy.deepcopy(moe).to(dtype)
        moe.experts.set_impl(impl)
        xi = x.detach().to(dtype).clone().requires_grad_(True)
        y, aux = moe(xi)
        y.float().square().sum().backward()
        return y.detach(), xi.grad, moe.router.weight.grad, aux

    y64, dx64, dr64, aux = run(moe64, "reference", torch.float64)
    assert torch.all(aux.tokens_per_expert % 128 == 0)
    y_ref, dx_ref, dr_ref, _ = run(moe64, "reference", torch.bfloat16)
    y_new, dx_new, dr_new, _ = run(moe64, "triton", torch.bfloat16)
    for new, ref, exact in ((y_new, y_ref, y64), (dx_new, dx_ref, dx64), (dr_new, dr_ref, dr64)):
        assert rel_err(new, exact) <= 2 * rel_err(ref, exact) + 1e-2
