"""Bad configuration and bad input raise clear ValueErrors naming the values."""

import pytest
import torch

from moekit.moe import MoE, MoEConfig


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=9, num_experts=8), r"top_k=9 exceeds num_experts=8"),
        (dict(router="sigmoid_topk", num_experts=8, num_groups=3), r"num_groups=3 .*num_experts=8"),
        (dict(router="sigmoid_topk", num_experts=8, num_groups=4, topk_groups=5), r"topk_groups=5"),
        (dict(router="softmax_topk", num_experts=8, num_groups=2), r"num_groups=2.*sigmoid_topk"),
        (dict(router="sigmoid_topk", num_experts=8, num_groups=4, topk_groups=1, top_k=3), r"top_k=3"),
        (dict(router="nope"), r"unknown router 'nope'"),
        (dict(d_model=-4), r"d_model must be a positive integer, got -4"),
        (dict(d_expert=0), r"d_expert must be a positive integer, got 0"),
        (dict(num_experts=2.5), r"num_experts must be a positive integer, got 2.5"),
        (dict(num_shared_experts=-1), r"num_shared_experts must be >= 0, got -1"),
        (dict(shared_gate=True), r"shared_gate=True needs num_shared_experts > 0"),
        (dict(experts_impl="cuda"), r"unknown experts_impl 'cuda'"),
        (dict(router="hash"), r"hash_vocab_size > 0"),
        (dict(router="expert_choice", causal=True), r"not causal"),
        (dict(token_rounding="sideways"), r"unknown token_rounding 'sideways'"),
        (dict(router="hash", hash_vocab_size=10, token_rounding="up"), r"token_rounding applies to top-k routers"),
        (dict(aux_loss_coef=-0.1), r"aux_loss_coef must be >= 0, got -0.1"),
        (dict(routed_scaling_factor=0.0), r"routed_scaling_factor must be positive"),
        (dict(capacity_factor=-1.0), r"capacity_factor must be positive"),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown MoE preset 'huge'"):
        MoEConfig.preset("huge")
    assert MoEConfig.preset("tiny").num_experts == 8


@pytest.mark.parametrize("shape", [(4, 63), (2, 3, 65), ()])
def test_wrong_input_shape(shape):
    moe = MoE(MoEConfig(d_model=64))
    with pytest.raises(ValueError, match=r"d_model=64"):
        moe(torch.randn(shape))


def test_integer_input_and_mismatched_token_ids():
    moe = MoE(MoEConfig(d_model=8, d_expert=4))
    with pytest.raises(ValueError, match="floating-point"):
        moe(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="token_ids has 3 ids but x has 2 tokens"):
        moe(torch.randn(2, 8), token_ids=torch.tensor([1, 2, 3]))


def test_output_shapes_and_api_names():
    cfg = MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2, num_shared_experts=2)
    moe = MoE(cfg)
    assert moe.router.weight.shape == (4, 16)
    assert moe.router.expert_bias.shape == (4,)
    assert moe.experts.w13.shape == (4, 16, 16)
    assert moe.experts.w2.shape == (4, 16, 8)
    assert moe.shared.w13.shape == (32, 16) and moe.shared.w2.shape == (16, 16)
    for shape in [(16,), (5, 16), (2, 3, 16)]:
        y, aux = moe(torch.randn(shape))
        assert y.shape == shape
        assert aux.tokens_per_expert.dtype == torch.int64 and aux.tokens_per_expert.shape == (4,)
        assert aux.loss.shape == ()
    assert "router.expert_bias" in moe.state_dict()


def test_dtype_mismatch_is_a_clear_error_and_autocast_works():
    moe = MoE(MoEConfig(d_model=16, d_expert=8, num_experts=4, top_k=2, num_shared_experts=1))
    with pytest.raises(ValueError, match="does not match the weights' dtype"):
        moe(torch.randn(3, 16, dtype=torch.bfloat16))
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert moe.experts.w13.grad.dtype == torch.float32 and moe.experts.w13.grad.abs().sum() > 0
    assert x.grad is not None and moe.router.weight.grad is not None


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk", "expert_choice", "hash"])
def test_builds_on_meta_device_without_memory(router):
    cfg = MoEConfig(d_model=2048, d_expert=768, num_experts=128, top_k=8, router=router,
                    num_shared_experts=1, hash_vocab_size=1000, router_noise=router != "hash")
    with torch.device("meta"):
        moe = MoE(cfg)
    assert all(t.device.type == "meta" for t in list(moe.parameters()) + list(moe.buffers()))
    expected = 128 * (2048 + 3 * 2048 * 768) + 3 * 2048 * 768 + (128 * 2048 if router != "hash" else 0)
    assert sum(p.numel() for p in moe.parameters()) == expected
