"""Router semantics against formulas worked by hand on small inputs."""

import math

import pytest
import torch

from moekit.moe import MoE, MoEConfig
from moekit.moe.router import balanced_hash_table, build_router


def identity_router(**kw):
    """A router whose logits equal its input (d_model = num_experts, weight = I)."""
    E = kw["num_experts"]
    cfg = MoEConfig(d_model=E, d_expert=4, **kw)
    r = build_router(cfg).double()
    with torch.no_grad():
        r.weight.copy_(torch.eye(E))
    return r


def pairs(routing):
    return {(t, e): g for t, e, g in zip(routing.token_idx_P.tolist(), routing.expert_idx_P.tolist(), routing.gates_P.tolist())}


def softmax(v):
    ex = [math.exp(a) for a in v]
    return [a / sum(ex) for a in ex]


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk(norm):
    r = identity_router(num_experts=4, top_k=2, router="softmax_topk", norm_topk_prob=norm)
    logits = [1.0, 2.0, 3.0, 0.5]
    p = softmax(logits)
    got = pairs(r(torch.tensor([logits], dtype=torch.float64)))
    denom = p[2] + p[1] if norm else 1.0
    assert got.keys() == {(0, 2), (0, 1)}
    assert got[(0, 2)] == pytest.approx(p[2] / denom, rel=1e-12)
    assert got[(0, 1)] == pytest.approx(p[1] / denom, rel=1e-12)


def test_topk_softmax():
    r = identity_router(num_experts=4, top_k=2, router="topk_softmax")
    got = pairs(r(torch.tensor([[1.0, 2.0, 3.0, 0.5]], dtype=torch.float64)))
    e3, e2 = math.exp(3), math.exp(2)
    assert got == pytest.approx({(0, 2): e3 / (e3 + e2), (0, 1): e2 / (e3 + e2)}, rel=1e-12)


def test_sigmoid_topk_groups_bias_and_scaling():
    # E=8 in 4 groups of 2; keep 2 groups; K=2; bias changes the selection, not the gates.
    r = identity_router(num_experts=8, top_k=2, router="sigmoid_topk", num_groups=4, topk_groups=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True)
    logits = [2.0, -3.0, 0.1, 0.2, 1.0, 1.5, -1.0, -2.0]
    s = [1 / (1 + math.exp(-a)) for a in logits]
    # group scores (sum of top-2 = both members): g0 = s0+s1, g1 = s2+s3, g2 = s4+s5, g3 = s6+s7
    # -> keep groups 2 and 1 (expert 0 is the single best but its group loses); top-2 = experts 5, 4
    got = pairs(r(torch.tensor([logits], dtype=torch.float64)))
    assert got.keys() == {(0, 5), (0, 4)}
    assert got[(0, 5)] == pytest.approx(2.5 * s[5] / (s[4] + s[5]), rel=1e-12)
    # bias on expert 3 lifts group 1 and expert 3 into the selection; its gate stays unbiased
    r.expert_bias[3] = 0.9
    got = pairs(r(torch.tensor([logits], dtype=torch.float64)))
    assert got.keys() == {(0, 3), (0, 5)}
    assert got[(0, 3)] == pytest.approx(2.5 * s[3] / (s[3] + s[5]), rel=1e-12)


def test_sigmoid_topk_without_norm():
    r = identity_router(num_experts=4, top_k=2, router="sigmoid_topk", norm_topk_prob=False)
    logits = [0.3, -0.2, 1.1, 0.0]
    got = pairs(r(torch.tensor([logits], dtype=torch.float64)))
    assert got == pytest.approx({(0, 2): 1 / (1 + math.exp(-1.1)), (0, 0): 1 / (1 + math.exp(-0.3))}, rel=1e-12)


def test_expert_choice_capacity():
    # T=4, E=2, K=1, capacity_factor=1 -> each expert takes ceil(4*1/2) = 2 tokens by probability
    r = identity_router(num_experts=2, top_k=1, router="expert_choice")
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.9], [-1.0, 3.0]], dtype=torch.float64)
    got = pairs(r(logits))
    p = [softmax(row) for row in logits.tolist()]
    assert got.keys() == {(0, 0), (2, 0), (3, 1), (1, 1)}
    assert got[(2, 0)] == pytest.approx(p[2][0], rel=1e-12)
    assert got[(1, 1)] == pytest.approx(p[1][1], rel=1e-12)


def test_expert_choice_refuses_causal():
    with pytest.raises(ValueError, match="causal"):
        MoEConfig(router="expert_choice", causal=True)


def test_hash_balanced_assignment():
    # frequencies 10, 1, 5, 3 into 2 experts: 0 -> e0 (10); 2 -> e1 (5); 3 -> e1 (8); 1 -> e1 (9)
    table = balanced_hash_table(torch.tensor([10.0, 1.0, 5.0, 3.0]), num_experts=2, top_k=1)
    assert table[:, 0].tolist() == [0, 1, 1, 1]
    # K=2 gives two distinct experts per id
    table = balanced_hash_table(torch.tensor([4.0, 3.0, 2.0, 1.0, 1.0]), num_experts=3, top_k=2)
    assert all(len(set(row)) == 2 for row in table.tolist())


def test_hash_router_routes_by_token_id():
    moe = MoE(MoEConfig(d_model=8, d_expert=4, num_experts=3, top_k=1, router="hash", hash_vocab_size=5))
    moe.router.build_hash_table(torch.tensor([10.0, 1.0, 5.0, 3.0, 0.0]))
    ids = torch.tensor([[0, 1, 2, 3, 4, 0]])
    _, aux = moe(torch.randn(1, 6, 8), token_ids=ids)
    assert aux.routing.expert_idx_P.tolist() == moe.router.hash_table[ids[0], 0].tolist()
    assert torch.all(aux.routing.gates_P == 1.0)
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="hash_vocab_size"):
        moe(torch.randn(1, 2, 8), token_ids=torch.tensor([[0, 7]]))


def test_noisy_topk_formula_and_eval_mode():
    r = identity_router(num_experts=4, top_k=2, router="topk_softmax", router_noise=True)
    with torch.no_grad():
        r.noise_weight.copy_(torch.randn(4, 4))
    x = torch.randn(5, 4, dtype=torch.float64)
    r.eval()
    torch.testing.assert_close(r.logits(x), x)  # no noise at inference
    r.train()
    torch.manual_seed(7)
    noisy = r.logits(x)
    torch.manual_seed(7)
    eps = torch.randn(5, 4, dtype=torch.float64)
    expected = x + eps * torch.nn.functional.softplus(x @ r.noise_weight.t())
    torch.testing.assert_close(noisy, expected)


def test_softmax_gates_stay_finite_when_bias_forces_unlikely_experts():
    # expert 3's logit is 200 below the row max; the bias makes it the only choice (K=1)
    r = identity_router(num_experts=4, top_k=1, router="topk_softmax")
    r.expert_bias[3] = 1000.0
    got = pairs(r(torch.tensor([[100.0, 0.0, 0.0, -100.0]], dtype=torch.float64)))
    assert got == {(0, 3): 1.0}
