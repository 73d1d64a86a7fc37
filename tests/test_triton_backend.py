"""The Triton backend (experts_impl='triton') against the reference, on the CPU interpreter.

TRITON_INTERPRET=1 is set before the kernels are imported (triton.jit reads it when a
kernel is defined), so these tests run the real kernels, slowly, on tiny shapes.
float64: tight. float32: err(triton) <= 2 * err(reference in float32) + atol, both
measured against the float64 reference (errors relative to the output scale).
bfloat16 gets a loose sanity check only: the interpreter rounds float32 -> bfloat16
by truncation (a GPU rounds to nearest even), so its bf16 errors are ~2-4x a GPU's
(test_triton_gpu.py applies the 2x rule to bf16 on CUDA).
Skipped when triton is not installed; on a CUDA machine run it with TRITON_INTERPRET=1
(the compiled kernels are tested by test_triton_gpu.py).
"""

import os
import sys

import pytest
import torch

from moekit.bench.memory import saved_bytes

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CUDA present: the compiled kernels are tested in test_triton_gpu.py "
                "(set TRITON_INTERPRET=1 to test the interpreter here)", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import copy  # noqa: E402

from moekit.moe import MoE, MoEConfig  # noqa: E402
from moekit.moe.experts import get_backend  # noqa: E402
from moekit.moe.reference import experts_reference  # noqa: E402
from moekit.moe.rounding import round_selection  # noqa: E402
from moekit.moe.triton import common, ops  # noqa: E402
from moekit.moe.triton.function import experts_triton  # noqa: E402
from moekit.moe.triton.routing import routing_metadata  # noqa: E402

if not common.INTERPRET:
    pytest.skip("moekit's triton kernels were imported before TRITON_INTERPRET=1 was set; "
                "run this file in its own process", allow_module_level=True)

F32_ATOL = 1e-6


# ---------------------------------------------------------------- routing cases


def make_routing(T, E, K, kind, gen):
    """(token_idx_P, expert_idx_P) for a routing kind."""
    if kind == "rounded":  # token rounding to a tile of 4: variable pairs per token and per expert
        scores_TE = torch.rand(T, E, generator=gen)
        topk_TK = scores_TE.topk(K, dim=1).indices
        mask_TE = round_selection(scores_TE, topk_TK, 4, "up")
        tok, exp = mask_TE.nonzero(as_tuple=True)
        return tok, exp
    if kind == "tile_multiple":  # every expert has 0 or 16 rows: whole interpreter tiles (BLOCK_M = 16)
        chosen = torch.tensor([0, 2, 3])[:K]
        return torch.arange(T).repeat_interleave(K), chosen.repeat(T)
    pool = E - 1 if kind == "zero_expert" else E  # the last expert never chosen
    exp_TK = torch.stack([torch.randperm(pool, generator=gen)[:K] for _ in range(T)])
    if kind == "one_expert":  # every token's first choice is expert 0
        exp_TK = torch.stack([torch.cat([torch.tensor([0]), torch.randperm(E - 1, generator=gen)[: K - 1] + 1])
                              for _ in range(T)])
    tok, exp = torch.arange(T).repeat_interleave(K), exp_TK.reshape(-1)
    if kind == "shuffled":  # pairs in no particular order
        perm = torch.randperm(tok.numel(), generator=gen)
        tok, exp = tok[perm], exp[perm]
    return tok, exp


# (T, D, F, E, K, kind): T=1, K=E, non-multiple-of-16 dims, zero-token expert, one expert, rounding
CASES = [
    (1, 12, 7, 5, 3, "random"),
    (12, 24, 16, 5, 5, "random"),
    (9, 20, 13, 4, 2, "zero_expert"),
    (10, 17, 9, 4, 1, "one_expert"),
    (8, 18, 11, 4, 3, "one_expert"),
    (11, 16, 8, 5, 2, "rounded"),
    (16, 16, 9, 4, 2, "tile_multiple"),
    (7, 20, 12, 6, 2, "shuffled"),
]


def make_inputs(T, D, F, E, K, kind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tok, exp = make_routing(T, E, K, kind, gen)
    P = tok.numel()
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w13 = torch.randn(E, 2 * F, D, generator=gen, dtype=torch.float64) * D**-0.5
    w2 = torch.randn(E, D, F, generator=gen, dtype=torch.float64) * F**-0.5
    gates = torch.rand(P, generator=gen, dtype=torch.float64)
    dout = torch.randn(T, D, generator=gen, dtype=torch.float64)
    return (x, w13, w2, gates), tok, exp, dout


def run_fn(fn, tensors, tok, exp, dout, dtype):
    leaves = [t.to(dtype if i < 3 else (torch.float64 if dtype == torch.float64 else torch.float32))
              .clone().requires_grad_(True) for i, t in enumerate(tensors)]
    y = fn(*leaves, tok, exp)
    (y * dout.to(dtype)).sum().backward()
    return [y.detach()] + [leaf.grad for leaf in leaves]


def rel_err(a, b):
    scale = b.double().abs().max().clamp_min(1e-6)
    return ((a.double() - b.double()).abs().max() / scale).item()


NAMES = ["y", "x", "w13", "w2", "gates"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_float64_matches_reference(case):
    T, D, F, E, K, kind = case
    tensors, tok, exp, dout = make_inputs(T, D, F, E, K, kind)
    ref = run_fn(experts_reference, tensors, tok, exp, dout, torch.float64)
    new = run_fn(experts_triton, tensors, tok, exp, dout, torch.float64)
    for name, a, b in zip(NAMES, new, ref):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{kind}: {name}")
    if kind == "zero_expert":
        assert torch.all(new[2][-1] == 0) and torch.all(new[3][-1] == 0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_float32_within_reference_error(case):
    T, D, F, E, K, kind = case
    tensors, tok, exp, dout = make_inputs(T, D, F, E, K, kind, seed=1)
    ref64 = run_fn(experts_reference, tensors, tok, exp, dout, torch.float64)
    ref32 = run_fn(experts_reference, tensors, tok, exp, dout, torch.float32)
    new32 = run_fn(experts_triton, tensors, tok, exp, dout, torch.float32)
    for name, n, r, r64 in zip(NAMES, new32, ref32, ref64):
        assert n.dtype == r.dtype, name
        e_new, e_ref = rel_err(n, r64), rel_err(r, r64)
        assert e_new <= 2 * e_ref + F32_ATOL, f"{kind} {name}: triton err {e_new:.2e} vs reference err {e_ref:.2e}"


def test_bfloat16_runs_close_to_reference():
    """bf16 operands, float32 accumulation; loose bound (the interpreter truncates on downcast)."""
    tensors, tok, exp, dout = make_inputs(12, 24, 16, 5, 2, "random", seed=2)
    ref64 = run_fn(experts_reference, tensors, tok, exp, dout, torch.float64)
    ref = run_fn(experts_reference, tensors, tok, exp, dout, torch.bfloat16)
    new = run_fn(experts_triton, tensors, tok, exp, dout, torch.bfloat16)
    for name, n, r, r64 in zip(NAMES, new, ref, ref64):
        assert n.dtype == r.dtype, name
        e_new, e_ref = rel_err(n, r64), rel_err(r, r64)
        assert e_new <= 5 * e_ref + 2e-2, f"{name}: triton err {e_new:.2e} vs reference err {e_ref:.2e}"


def test_empty_routing_gives_zeros():
    x = torch.randn(5, 16, requires_grad=True)
    w13, w2 = torch.randn(3, 8, 16, requires_grad=True), torch.randn(3, 16, 4, requires_grad=True)
    gates = torch.rand(0, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.int64)
    y = experts_triton(x, w13, w2, gates, idx, idx)
    y.sum().backward()
    assert torch.equal(y, torch.zeros(5, 16))
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w13.grad, torch.zeros_like(w13))


# ---------------------------------------------------------------- the whole layer (router weight included)


def make_moe(router, shape, **extra):
    T, D, F, E, K = shape
    kw = dict(d_model=D, d_expert=F, num_experts=E, top_k=K, router=router, experts_impl="reference",
              aux_loss_coef=0.01, z_loss_coef=0.001)
    kw.update(extra)
    return MoE(MoEConfig(**kw))


def run_layer(moe, impl, x, grad_out):
    moe = copy.deepcopy(moe)
    moe.experts.set_impl(impl)
    x = x.detach().clone().requires_grad_(True)
    y, aux = moe(x)
    ((y * grad_out).sum() + aux.loss).backward()
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in moe.named_parameters() if p.grad is not None})
    return y.detach(), grads, aux


LAYERS = [
    ("softmax_topk", dict(num_shared_experts=1)),
    ("sigmoid_topk", {}),
    ("expert_choice", {}),
    ("softmax_topk", dict(token_rounding="up", rounding_tile=4)),
]


@pytest.mark.parametrize("router,extra", LAYERS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_layer_matches_reference(router, extra):
    shape = (12, 16, 8, 5, 2)
    moe64 = make_moe(router, shape, **extra).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    g = torch.randn_like(x)
    y_ref, gr_ref, aux_ref = run_layer(moe64, "reference", x, g)
    y_new, gr_new, aux_new = run_layer(moe64, "triton", x, g)
    assert {"x", "router.weight", "experts.w13", "experts.w2"} <= gr_ref.keys() == gr_new.keys()
    torch.testing.assert_close(y_new, y_ref, rtol=1e-10, atol=1e-12)
    for name in gr_ref:
        torch.testing.assert_close(gr_new[name], gr_ref[name], rtol=1e-10, atol=1e-12, msg=f"grad {name}")
    assert torch.equal(aux_new.tokens_per_expert, aux_ref.tokens_per_expert)
    if "token_rounding" in extra:
        assert torch.all(aux_ref.tokens_per_expert % 4 == 0)

    moe32 = copy.deepcopy(moe64).float()
    y32, gr32, _ = run_layer(moe32, "reference", x.float(), g.float())
    yt, grt, _ = run_layer(moe32, "triton", x.float(), g.float())
    assert rel_err(yt, y_ref) <= 2 * rel_err(y32, y_ref) + F32_ATOL
    for name in gr_ref:
        e_new, e_ref = rel_err(grt[name], gr_ref[name]), rel_err(gr32[name], gr_ref[name])
        assert e_new <= 2 * e_ref + F32_ATOL, f"grad {name}: triton err {e_new:.2e} vs reference err {e_ref:.2e}"


# ---------------------------------------------------------------- memory contract


def test_saves_only_x_h_gates_and_indices():
    T, D, F, E, K = 48, 32, 16, 6, 2
    x = torch.randn(T, D, requires_grad=True)
    w13 = torch.randn(E, 2 * F, D, requires_grad=True)
    w2 = torch.randn(E, D, F, requires_grad=True)
    gates = torch.rand(T * K, requires_grad=True)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).reshape(-1)
    nbytes, _ = saved_bytes(lambda: experts_triton(x, w13, w2, gates, tok, exp), params=(w13, w2))
    x_bytes, h_bytes = T * D * 4, T * K * 2 * F * 4
    assert x_bytes + h_bytes <= nbytes <= 1.1 * (x_bytes + h_bytes) + 64 * T * K
    # the gathered X, A (T*K*F) and Y (T*K*D) would each break the bound
    assert nbytes < x_bytes + h_bytes + T * K * F * 4


def test_layer_saves_much_less_than_reference():
    T, D, F, E, K = 48, 32, 16, 6, 2
    moe = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K, experts_impl="triton"))
    x = torch.randn(T, D, requires_grad=True)
    triton_bytes, (_, aux) = saved_bytes(lambda: moe(x), params=list(moe.parameters()))
    P = aux.routing.token_idx_P.numel()
    assert triton_bytes <= 1.1 * (T * D * 4 + P * 2 * F * 4) + 64 * P
    moe.experts.set_impl("reference")
    reference_bytes, _ = saved_bytes(lambda: moe(x), params=list(moe.parameters()))
    assert reference_bytes > 2 * triton_bytes


# ---------------------------------------------------------------- compile, fake tensors, custom ops


def test_compiled_layer_fullgraph_matches_eager():
    """torch.compile(fullgraph=True): the custom ops' fake registrations let the whole layer,
    forward and backward, trace into one graph (aot_eager: no code generation on the CPU)."""
    moe = make_moe("softmax_topk", (10, 16, 8, 4, 2), experts_impl="triton")
    x = torch.randn(10, 16)
    g = torch.randn_like(x)
    y_ref, gr_ref, _ = run_layer(moe, "triton", x, g)
    torch._dynamo.reset()
    compiled = copy.deepcopy(moe)
    compiled_fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    xc = x.clone().requires_grad_(True)
    y, aux = compiled_fn(xc)
    ((y * g).sum() + aux.loss).backward()
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, gr_ref["x"], rtol=1e-5, atol=1e-6)
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, gr_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fake_tensor_mode_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    T, D, F, E, K = 6, 16, 8, 3, 2
    with FakeTensorMode():
        x = torch.randn(T, D, requires_grad=True)
        w13, w2 = torch.randn(E, 2 * F, D, requires_grad=True), torch.randn(E, D, F, requires_grad=True)
        gates = torch.rand(T * K, requires_grad=True)
        tok = torch.arange(T).repeat_interleave(K)
        exp = torch.zeros(T * K, dtype=torch.int64)
        y = experts_triton(x, w13, w2, gates, tok, exp)
        y.sum().backward()
        assert y.shape == (T, D) and y.dtype == x.dtype
        assert w13.grad.shape == w13.shape and w2.grad.shape == w2.shape
        assert x.grad.shape == x.shape and gates.grad.shape == gates.shape


def test_custom_ops_opcheck():
    T, D, F, E, K = 7, 20, 13, 4, 2
    x, w13, w2 = torch.randn(T, D), torch.randn(E, 2 * F, D), torch.randn(E, D, F)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).reshape(-1)
    m = routing_metadata(tok, exp, T, E)
    gates = torch.rand(T * K)
    h, a = ops.up_proj_swiglu(x, w13, gates, m.tok_P, m.offsets_E1)
    y = ops.grouped_mm(a, w2, m.offsets_E1, True)
    dout = torch.randn(T, D)
    cases = [
        (ops._up_swiglu, (x, w13, gates, m.tok_P, m.offsets_E1)),
        (ops._grouped_mm, (a, w2, m.offsets_E1, True)),
        (ops._grouped_mm, (h, w13, m.offsets_E1, False)),
        (ops._swiglu_dh, (dout, w2, h, gates, m.tok_P, m.offsets_E1)),
        (ops._grouped_wgrad, (dout, a, m.tok_P, m.offsets_E1, True, False)),
        (ops._grouped_wgrad, (h, x, m.tok_P, m.offsets_E1, False, True)),
        (ops._gather_sum, (y, m.ptr_T1, m.pos_P)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_routing_metadata():
    tok = torch.tensor([0, 0, 1, 1, 2, 3])
    exp = torch.tensor([2, 0, 0, 3, 2, 0])
    m = routing_metadata(tok, exp, 5, 4)
    assert m.offsets_E1.tolist() == [0, 3, 3, 5, 6]
    assert m.tok_P.tolist() == [0, 1, 3, 0, 2, 1]  # pairs sorted by expert, stable
    assert m.ptr_T1.tolist() == [0, 2, 4, 5, 6, 6]  # token 4 has no pairs
    assert m.pos_P.tolist() == [3, 0, 1, 5, 4, 2]
    assert all(t.dtype == torch.int32 for t in m[1:])


# ---------------------------------------------------------------- errors


def small_inputs():
    T, D, F, E, K = 4, 16, 8, 3, 2
    return (torch.randn(T, D), torch.randn(E, 2 * F, D), torch.randn(E, D, F), torch.rand(T * K),
            torch.arange(T).repeat_interleave(K), torch.tensor([0, 1, 1, 2, 0, 2, 1, 0]))


@pytest.mark.parametrize("i,bad,match", [
    (0, torch.randn(1, 4, 16), r"x must have shape \(\*, \*\), got \(1, 4, 16\)"),
    (0, torch.randn(4, 15), r"w13 must have shape \(\*, \*, 15\), got \(3, 16, 16\)"),
    (0, torch.randn(4, 16, dtype=torch.float64), "w13 has dtype torch.float32 but the activations are torch.float64"),
    (0, torch.randint(0, 3, (4, 16)), "x has dtype torch.int64"),
    (1, torch.randn(3, 15, 16), "even middle dim"),
    (2, torch.randn(3, 16, 7), r"w2 must have shape \(3, 16, 8\), got \(3, 16, 7\)"),
    (3, torch.rand(7), r"gates must have shape \(8\), got \(7,\)"),
    (3, torch.randint(0, 2, (8,)), "gates must be a float tensor"),
    (5, torch.zeros(8), "expert_idx must be int32 or int64"),
    (5, torch.zeros(8, dtype=torch.int64, device="meta"), "all tensors on one device"),
])
def test_bad_inputs_raise_clear_errors(i, bad, match):
    args = list(small_inputs())
    args[i] = bad
    with pytest.raises(ValueError, match=match):
        experts_triton(*args)


def test_wrapper_checks():
    x, w13, w2, gates, tok, exp = small_inputs()
    m = routing_metadata(tok, exp, 4, 3)
    with pytest.raises(ValueError, match="offsets must be torch.int32"):
        ops.grouped_mm(torch.randn(8, 8), w2, m.offsets_E1.long(), transpose=True)
    with pytest.raises(ValueError, match=r"offsets must have shape \(4\)"):
        ops.up_proj_swiglu(x, w13, gates, m.tok_P, m.offsets_E1[:3])
    with pytest.raises(ValueError, match="pass gather_b=True"):
        ops.grouped_wgrad(torch.randn(8, 16), x, m.tok_P, m.offsets_E1)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA device.*TRITON_INTERPRET=1"):
        experts_triton(*small_inputs())


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    with pytest.raises(ValueError, match="needs the `triton` package"):
        get_backend("triton")
    with pytest.raises(ValueError, match="needs the `triton` package"):
        MoE(MoEConfig(d_model=8, d_expert=4, num_experts=2, top_k=1, experts_impl="triton"))


def test_backend_is_wired():
    assert get_backend("triton") is experts_triton
    moe = MoE(MoEConfig(d_model=8, d_expert=4, num_experts=2, top_k=1, experts_impl="triton"))
    assert moe.experts.impl == "triton"
