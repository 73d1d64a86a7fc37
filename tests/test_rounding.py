"""Token rounding: tile-multiple counts, original choices first, refill by score."""

import pytest
import torch

from moekit.moe import MoE, MoEConfig
from moekit.moe.rounding import round_selection, rounded_counts


def test_rounded_counts_by_hand():
    counts = torch.tensor([0, 1, 3, 4, 5, 6, 7])
    assert rounded_counts(counts, 4, "up", 100).tolist() == [0, 4, 4, 4, 8, 8, 8]
    assert rounded_counts(counts, 4, "down", 100).tolist() == [0, 0, 0, 4, 4, 4, 4]
    assert rounded_counts(counts, 4, "nearest", 100).tolist() == [0, 0, 4, 4, 4, 8, 8]
    assert rounded_counts(torch.tensor([9]), 8, "up", 10).tolist() == [10]  # never more than T tokens


def test_round_selection_by_hand():
    # T=5, E=2, K=1, tile 2. Expert 0 chosen by tokens 0,1,2 (3 -> up: 4, down: 2); expert 1 by 3,4 (stays 2)
    select = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    topk = select.topk(1, dim=-1).indices
    up = round_selection(select, topk, 2, "up")
    # refill expert 0 with the best non-chosen token by score: token 4 (0.45) beats token 3 (0.3)
    assert up[:, 0].tolist() == [True, True, True, False, True]
    assert up[:, 1].tolist() == [False, False, False, True, True]
    down = round_selection(select, topk, 2, "down")
    # drop expert 0's lowest-scoring original choice: token 2 (0.6), which now has no expert
    assert down[:, 0].tolist() == [True, True, False, False, False]
    assert down[:, 1].tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("mode", ["up", "down", "nearest"])
@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
def test_layer_counts_are_tile_multiples(mode, router):
    T, E, K, tile = 203, 8, 2, 16
    moe = MoE(MoEConfig(d_model=24, d_expert=8, num_experts=E, top_k=K, router=router,
                        token_rounding=mode, rounding_tile=tile))
    x = torch.randn(T, 24)
    _, aux = moe(x)
    counts = aux.tokens_per_expert
    assert torch.all(counts % tile == 0)
    plain = MoE(moe.cfg.replace(token_rounding=None))
    plain.load_state_dict(moe.state_dict())
    _, aux0 = plain(x)
    before = aux0.tokens_per_expert
    assert torch.equal(counts, rounded_counts(before, tile, mode, T))
    # rounding up keeps every original pair; rounding down adds none
    orig = set(zip(aux0.routing.token_idx_P.tolist(), aux0.routing.expert_idx_P.tolist()))
    new = set(zip(aux.routing.token_idx_P.tolist(), aux.routing.expert_idx_P.tolist()))
    if mode == "up":
        assert orig <= new
    if mode == "down":
        assert new <= orig
    # gates are renormalised over each token's new set of experts
    sums = torch.zeros(T, dtype=torch.float32).index_add(0, aux.routing.token_idx_P, aux.routing.gates_P.float())
    has = torch.bincount(aux.routing.token_idx_P, minlength=T) > 0
    torch.testing.assert_close(sums[has], torch.ones(int(has.sum())))


def test_rounding_off_by_default():
    assert MoEConfig().token_rounding is None
