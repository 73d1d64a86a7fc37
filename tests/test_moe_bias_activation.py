"""Expert biases, router bias and the clamped SwiGLU (gpt-oss) in every expert kernel.

The reference is transformers' own `GptOssMLP` (router + `GptOssExperts`) with its weights
copied into a moekit `MoE` (gate/up columns de-interleaved, matrices transposed): outputs and
all gradients (x, router weight and bias, w13, w2, b13, b2) in float64.
"""

import copy
import math

import pytest
import torch

from moekit.bench.memory import saved_bytes
from moekit.moe import MoE, MoEConfig
from moekit.moe.activation import ClampedSwiGLU, SwiGLUActivation, build_activation
from moekit.moe.experts import Experts
from moekit.moe.grouped import experts_grouped
from moekit.moe.reference import experts_reference
from moekit.numerics import batch_invariant

transformers = pytest.importorskip("transformers")
from transformers import GptOssConfig  # noqa: E402
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP  # noqa: E402

D, F, E = 12, 10, 6


def hf_pair(top_k: int, seed: int = 0, scale: float = 1.0):
    """A random transformers GptOssMLP and the moekit MoE holding the same weights (float64)."""
    hf_cfg = GptOssConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=top_k)
    hf_cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    hf = GptOssMLP(hf_cfg).double()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, scale)
    cfg = MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=top_k, router="topk_softmax", router_bias=True,
                    expert_bias=True, activation="swiglu_oai", swiglu_limit=hf_cfg.swiglu_limit,
                    swiglu_alpha=hf_cfg.swiglu_alpha)
    moe = MoE(cfg).double()
    ex, hx = moe.experts, hf.experts
    with torch.no_grad():
        moe.router.weight.copy_(hf.router.weight)
        moe.router.bias.copy_(hf.router.bias)
        gu = hx.gate_up_proj  # (E, D, 2F), columns interleaved gate, up, gate, up, ...
        ex.w13.copy_(torch.cat([gu[..., ::2], gu[..., 1::2]], dim=-1).transpose(1, 2))
        ex.b13.copy_(torch.cat([hx.gate_up_proj_bias[:, ::2], hx.gate_up_proj_bias[:, 1::2]], dim=-1))
        ex.w2.copy_(hx.down_proj.transpose(1, 2))
        ex.b2.copy_(hx.down_proj_bias)
    return hf, moe


def hf_grads(hf):
    """transformers' gradients in moekit's layout."""
    hx = hf.experts
    gu, gb = hx.gate_up_proj.grad, hx.gate_up_proj_bias.grad
    return {"router.weight": hf.router.weight.grad, "router.bias": hf.router.bias.grad,
            "experts.w13": torch.cat([gu[..., ::2], gu[..., 1::2]], dim=-1).transpose(1, 2),
            "experts.b13": torch.cat([gb[:, ::2], gb[:, 1::2]], dim=-1),
            "experts.w2": hx.down_proj.grad.transpose(1, 2), "experts.b2": hx.down_proj_bias.grad}


def run_both(hf, moe, T: int, seed: int = 1, x_scale: float = 1.0):
    torch.manual_seed(seed)
    x = (torch.randn(1, T, D, dtype=torch.float64) * x_scale).requires_grad_()
    dy = torch.randn(1, T, D, dtype=torch.float64)
    y_hf, _ = hf(x)
    (y_hf * dy).sum().backward()
    dx_hf, x.grad = x.grad, None
    y, _ = moe(x)
    (y * dy).sum().backward()
    return (y_hf, dx_hf, hf_grads(hf)), (y, x.grad, {n: p.grad for n, p in moe.named_parameters()})


# T=1 leaves most experts without tokens; K=E routes every token to every expert
GRID = [(1, 2), (7, 2), (33, 4), (5, E), (64, 3)]
KERNELS = [("reference", "auto"), ("grouped", "compact"), ("grouped", "padded"), ("grouped", "auto")]


@pytest.mark.parametrize("impl,layout", KERNELS)
@pytest.mark.parametrize("T,K", GRID)
def test_training_kernels_match_transformers(impl, layout, T, K):
    hf, moe = hf_pair(K, scale=1.5)  # scale: many pre-activations beyond the clamp limit 7
    moe.experts.set_impl(impl, layout)
    (y_hf, dx_hf, g_hf), (y, dx, g) = run_both(hf, moe, T)
    torch.testing.assert_close(y, y_hf, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, dx_hf, rtol=1e-10, atol=1e-10)
    assert set(g) == set(g_hf)
    for name in g_hf:
        torch.testing.assert_close(g[name], g_hf[name], rtol=1e-10, atol=1e-10, msg=name)


def test_clamps_are_exercised():
    """The weights above put pre-activations on both sides of the limit (else the clamp goes untested)."""
    hf, moe = hf_pair(2, scale=1.5)
    torch.manual_seed(1)
    x = torch.randn(64, D, dtype=torch.float64)
    h = x @ moe.experts.w13[0].t() + moe.experts.b13[0]
    assert (h[:, :F] > 7).any() and (h[:, :F] < 7).any() and (h[:, F:].abs() > 7).any()


@pytest.mark.parametrize("T,K", GRID)
def test_inference_kernels_match_transformers(T, K):
    """gathered (few pairs), static (gathered matvec and dense all-experts) and batch-invariant."""
    hf, moe = hf_pair(K, scale=1.5)
    moe.eval()
    torch.manual_seed(1)
    x = torch.randn(1, T, D, dtype=torch.float64)
    with torch.no_grad():
        y_hf, _ = hf(x)
        outs = {"eager": moe(x)[0], "static": moe(x, static=True)[0],
                "invariant": moe(x, numerics=batch_invariant())[0]}
        routing = moe.router(x.view(-1, D))
        from moekit.moe.gathered import experts_gathered, experts_static
        args = moe.experts.kernel_args(torch.float64)
        ex = moe.experts
        outs["gathered"] = experts_gathered(x.view(-1, D), ex.w13, ex.w2, routing.gates_P, routing.token_idx_P,
                                            routing.expert_idx_P, **args)
        for allow_dense in (False, True):
            outs[f"static-{allow_dense}"] = experts_static(x.view(-1, D), ex.w13, ex.w2, routing.gates_TK,
                                                           routing.expert_idx_TK, allow_dense, **args)
    for name, y in outs.items():
        torch.testing.assert_close(y.view_as(y_hf), y_hf, rtol=1e-10, atol=1e-10, msg=name)


def test_activation_backward_matches_autograd():
    """Each registered activation's hand-written backward equals autograd of its forward, clamp
    edges (exactly +-limit, beyond it) included."""
    h = torch.randn(9, 2 * F, dtype=torch.float64) * 6
    h[0, :4] = torch.tensor([7.0, -7.0, 7.5, -30.0], dtype=torch.float64)
    h[0, F:F + 4] = torch.tensor([7.0, -7.0, 7.5, -30.0], dtype=torch.float64)
    da = torch.randn(9, F, dtype=torch.float64)
    for act in (SwiGLUActivation(), ClampedSwiGLU(), ClampedSwiGLU(limit=3.0, alpha=0.5)):
        hh = h.clone().requires_grad_()
        (act(hh) * da).sum().backward()
        torch.testing.assert_close(act.backward(h, da), hh.grad, rtol=1e-12, atol=1e-12, msg=repr(act))


def test_clamped_swiglu_formula_by_hand():
    """One hand-worked value: g = 8 -> 7 (clamped), u = -9 -> -7: (u + 1) * g * sigmoid(1.702 g)."""
    act = ClampedSwiGLU()
    h = torch.tensor([[8.0, -9.0], [0.5, 2.0]], dtype=torch.float64)
    expected = torch.tensor([[-6 * 7 / (1 + math.exp(-1.702 * 7.0))], [3 * 0.5 / (1 + math.exp(-1.702 * 0.5))]],
                            dtype=torch.float64)
    torch.testing.assert_close(act(h), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_grouped_saves_no_more_with_biases(layout):
    """Memory contract: biases and the activation add no saved activations (only the bias parameters)."""
    T, K = 40, 2
    torch.manual_seed(0)
    x = torch.randn(T, D, requires_grad=True)
    w13 = torch.randn(E, 2 * F, D, requires_grad=True)
    w2 = torch.randn(E, D, F, requires_grad=True)
    b13 = torch.randn(E, 2 * F, requires_grad=True)
    b2 = torch.randn(E, D, requires_grad=True)
    gates = torch.rand(T * K, requires_grad=True)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.randint(0, E, (T * K,))
    params = (w13, w2, b13, b2)
    plain, _ = saved_bytes(lambda: experts_grouped(x, w13, w2, gates, tok, exp, layout), params)
    biased, out = saved_bytes(lambda: experts_grouped(x, w13, w2, gates, tok, exp, layout, b13, b2,
                                                      ClampedSwiGLU()), params)
    assert biased == plain
    ref = experts_reference(x, w13, w2, gates, tok, exp, b13, b2, ClampedSwiGLU())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_state_dict_names_and_zero_init():
    cfg = MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=2, router="topk_softmax", router_bias=True,
                    expert_bias=True, activation="swiglu_oai")
    moe = MoE(cfg)
    sd = moe.state_dict()
    assert sd["experts.b13"].shape == (E, 2 * F) and sd["experts.b2"].shape == (E, D)
    assert sd["router.bias"].shape == (E,)
    assert not sd["experts.b13"].any() and not sd["experts.b2"].any() and not sd["router.bias"].any()
    plain = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=2)).state_dict()
    assert not {"experts.b13", "experts.b2", "router.bias"} & set(plain)
    assert MoEConfig(**cfg.to_dict()) == cfg  # the fields round-trip through a checkpoint's config


def test_bf16_autocast_with_fp32_biases():
    hf, moe = hf_pair(2, scale=0.3)
    moe.float()
    x = torch.randn(9, D)
    ref, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    y.float().sum().backward()
    assert moe.experts.b13.grad.dtype == torch.float32 and moe.experts.b2.grad.abs().sum() > 0
    assert y.dtype == torch.bfloat16 and ((y.float() - ref).norm() / ref.norm()) < 0.03


def test_user_errors():
    base = dict(d_model=D, d_expert=F, num_experts=E, top_k=2)
    with pytest.raises(ValueError, match="unknown expert activation 'gelu'"):
        MoEConfig(**base, activation="gelu")
    with pytest.raises(ValueError, match="swiglu_limit=5.0 applies to activation='swiglu_oai'"):
        MoEConfig(**base, swiglu_limit=5.0)
    with pytest.raises(ValueError, match="swiglu_alpha must be positive"):
        MoEConfig(**base, activation="swiglu_oai", swiglu_alpha=0.0)
    with pytest.raises(ValueError, match="router_bias has no meaning for router='hash'"):
        MoEConfig(**base, router="hash", hash_vocab_size=10, router_bias=True)
    with pytest.raises(ValueError, match=r"triton' runs plain SwiGLU experts only.*expert biases"):
        MoEConfig(**base, expert_bias=True, experts_impl="triton") and Experts(
            MoEConfig(**base, expert_bias=True, experts_impl="triton"))
    experts = Experts(MoEConfig(**base, activation="swiglu_oai"))
    with pytest.raises(ValueError, match="activation='swiglu_oai'"):
        experts.set_impl("triton")
    assert experts.impl == "grouped"  # unchanged after the refusal
    assert build_activation(MoEConfig(**base)).name == "swiglu"


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_all_tokens_on_one_expert(layout):
    hf, moe = hf_pair(1, scale=1.5)
    with torch.no_grad():
        hf.router.bias[3] = moe.router.bias[3] = 1e3
    moe.experts.set_impl("grouped", layout)
    (y_hf, dx_hf, g_hf), (y, dx, g) = run_both(hf, moe, 9)
    assert g["experts.b2"][[0, 1, 2, 4, 5]].abs().sum() == 0 and g["experts.b2"][3].abs().sum() > 0
    torch.testing.assert_close(y, y_hf, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, dx_hf, rtol=1e-10, atol=1e-10)
    for name in g_hf:
        torch.testing.assert_close(g[name], g_hf[name], rtol=1e-10, atol=1e-10, msg=name)


def test_float32_grouped_within_twice_the_reference_error():
    """float32: the grouped kernel's error against transformers in float64 is at most twice the
    float32 reference kernel's own error (+ a small atol)."""
    hf, moe64 = hf_pair(3, scale=1.0)
    (y_hf, dx_hf, g_hf), _ = run_both(hf, copy.deepcopy(moe64), 33)
    errs = {}
    for impl in ("reference", "grouped"):
        moe = copy.deepcopy(moe64).float()
        moe.experts.set_impl(impl, "auto")
        torch.manual_seed(1)
        x = torch.randn(1, 33, D, dtype=torch.float64).float().requires_grad_()
        dy = torch.randn(1, 33, D, dtype=torch.float64).float()
        y, _ = moe(x)
        (y * dy).sum().backward()
        errs[impl] = [(y.double() - y_hf).abs().max(), (x.grad.double() - dx_hf).abs().max()] + [
            (p.grad.double() - g_hf[n]).abs().max() for n, p in moe.named_parameters()]
    for ref_err, err in zip(errs["reference"], errs["grouped"]):
        assert err <= 2 * ref_err + 1e-5
