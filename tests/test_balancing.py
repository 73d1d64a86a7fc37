"""Balancing losses against closed forms, and the aux-loss-free bias update."""

import math

import pytest
import torch
from torch import nn

from moekit.moe import MoE, MoEConfig, update_expert_biases
from moekit.moe.balancing import bias_update, switch_loss


def uniform_moe(router, **kw):
    """Router weight zero: every token sees the uniform distribution over experts."""
    moe = MoE(MoEConfig(d_model=16, d_expert=8, num_experts=8, top_k=2, router=router, **kw))
    with torch.no_grad():
        moe.router.weight.zero_()
    return moe


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_switch_loss_is_alpha_under_uniform_routing(router):
    _, aux = uniform_moe(router, aux_loss_coef=0.02)(torch.randn(3, 10, 16))
    assert aux.switch_loss.item() == pytest.approx(1.0, rel=1e-6)
    assert aux.loss.item() == pytest.approx(0.02, rel=1e-6)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_sequence_loss_is_alpha_under_uniform_routing(router):
    _, aux = uniform_moe(router, seq_aux_loss_coef=1e-4)(torch.randn(3, 10, 16))
    assert aux.seq_aux_loss.item() == pytest.approx(1.0, rel=1e-6)
    assert aux.loss.item() == pytest.approx(1e-4, rel=1e-6)


def test_switch_loss_skewed_by_hand():
    # T=4, E=2: first choices [0, 0, 0, 1] -> f = (3/4, 1/4); P = mean probs
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    f0, f1, P0, P1 = 0.75, 0.25, (0.9 + 0.8 + 0.6 + 0.3) / 4, (0.1 + 0.2 + 0.4 + 0.7) / 4
    got = switch_loss(probs, torch.tensor([0, 0, 0, 1]))
    assert got.item() == pytest.approx(2 * (f0 * P0 + f1 * P1), rel=1e-6)


def test_sequence_loss_by_hand():
    # one sequence of S=2 tokens, E=2, K=1 with sigmoid scores; token 0 -> e0, token 1 -> e0
    moe = MoE(MoEConfig(d_model=2, d_expert=4, num_experts=2, top_k=1, router="sigmoid_topk", seq_aux_loss_coef=1.0)).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[2.0, 0.0], [1.0, 0.5]]], dtype=torch.float64)
    _, aux = moe(x)
    s = [[1 / (1 + math.exp(-a)) for a in row] for row in x[0].tolist()]
    P = [sum(row[i] / sum(row) for row in s) / 2 for i in range(2)]
    f = [2 / (1 * 2) * 2, 0.0]  # E/(K*S) * count
    assert aux.seq_aux_loss.item() == pytest.approx(f[0] * P[0] + f[1] * P[1], rel=1e-12)


def test_z_loss_by_hand():
    moe = MoE(MoEConfig(d_model=3, d_expert=4, num_experts=3, top_k=1, z_loss_coef=0.5)).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3))
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    _, aux = moe(x)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in x.tolist()]
    expected = sum(v * v for v in lse) / 2
    assert aux.z_loss.item() == pytest.approx(expected, rel=1e-12)
    assert aux.loss.item() == pytest.approx(0.5 * expected, rel=1e-12)


def test_losses_have_gradients_only_when_enabled():
    moe = uniform_moe("softmax_topk", aux_loss_coef=0.0)
    _, aux = moe(torch.randn(4, 16))
    assert not aux.loss.requires_grad
    moe = uniform_moe("softmax_topk", z_loss_coef=1e-3)
    _, aux = moe(torch.randn(4, 16))
    aux.loss.backward()
    assert moe.router.weight.grad is not None


def test_bias_update_sign_rule_by_hand():
    bias = torch.zeros(4)
    bias_update(bias, torch.tensor([5, 1, 3, 3]), gamma=0.1)
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


@pytest.mark.parametrize("router", ["sigmoid_topk", "softmax_topk"])
def test_bias_update_moves_load_toward_balance(router):
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=16, d_expert=8, num_experts=8, top_k=2, router=router, bias_update_speed=0.01))
    with torch.no_grad():  # skew: expert 0 and 1 favoured by every token
        moe.router.weight[:2] += 0.3
    x = torch.randn(512, 16) + 0.5

    def imbalance():
        with torch.no_grad():
            moe.eval()
            _, aux = moe(x)
            moe.train()
        load = aux.tokens_per_expert.double()
        return (load.max() / load.mean()).item()

    before = imbalance()
    history = []
    for _ in range(100):
        with torch.no_grad():
            moe(x)
        used = moe.update_expert_bias()
        assert used.sum() == 512 * 2  # the counts since the last update
        history.append(imbalance())
    # the sign rule oscillates around balance: judge the average of the last 20 updates
    after = sum(history[-20:]) / 20
    assert before > 2.5  # max load ~2.8x the mean at the start
    assert after < 1.35
    assert moe.tokens_since_update.sum() == 0


def test_counts_accumulate_only_in_training_and_helper_updates_all_layers():
    model = nn.Sequential(MoE(MoEConfig()), MoE(MoEConfig()))
    model.eval()
    model[0](torch.randn(5, 64))
    assert model[0].tokens_since_update.sum() == 0
    model.train()
    model[0](torch.randn(5, 64))
    model[0](torch.randn(3, 64))
    assert model[0].tokens_since_update.sum() == 8 * 2
    assert update_expert_biases(model, gamma=0.01) == 2
    assert model[0].tokens_since_update.sum() == 0
    assert model[0].router.expert_bias.abs().sum() > 0


def test_eval_mode_skips_balancing_losses():
    moe = uniform_moe("softmax_topk", aux_loss_coef=0.02, z_loss_coef=0.1).eval()
    _, aux = moe(torch.randn(6, 16))
    assert aux.loss.item() == 0.0 and aux.switch_loss is None and aux.z_loss is None
    assert aux.tokens_per_expert.sum() == 12
