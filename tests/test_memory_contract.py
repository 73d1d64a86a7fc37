"""The grouped backend's memory contract, measured with saved_tensors_hooks.

Saved for backward (excluding parameters) <= 1.1 * (bytes(X) + bytes(H)) + 64 * T * K,
H = (T*K, 2F) the up-projection output.
"""

import pytest
import torch

from moekit.moe import MoE, MoEConfig
from moekit.bench.memory import saved_bytes
from moekit.moe.grouped import experts_grouped


@pytest.mark.parametrize("layout", ["compact", "padded", 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D,F,E,K", [(512, 128, 32, 64, 8), (300, 96, 64, 16, 4), (256, 64, 16, 8, 8)])
def test_grouped_experts_save_only_x_and_h(layout, dtype, T, D, F, E, K):
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    w13 = torch.randn(E, 2 * F, D, dtype=dtype, requires_grad=True)
    w2 = torch.randn(E, D, F, dtype=dtype, requires_grad=True)
    gates = torch.rand(T * K, requires_grad=True)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).reshape(-1)
    nbytes, _ = saved_bytes(lambda: experts_grouped(x, w13, w2, gates, tok, exp, layout), params=(w13, w2))
    elem = x.element_size()
    x_bytes, h_bytes = T * D * elem, T * K * 2 * F * elem
    assert nbytes <= 1.1 * (x_bytes + h_bytes) + 64 * T * K
    # and H really is kept: at least X + H
    assert nbytes >= x_bytes + h_bytes


@pytest.mark.parametrize("router,norm", [("softmax_topk", True), ("sigmoid_topk", True), ("topk_softmax", True),
                                         ("softmax_topk", False), ("expert_choice", True)])
def test_whole_layer_meets_the_contract(router, norm):
    """Router included: gates are computed from the gathered (T*K) logits, so no (T, E) tensor is kept,
    except that unnormalised softmax gates need logsumexp over all E (its backward keeps the (T, E) logits)."""
    T, D, F, E, K = 512, 128, 32, 64, 8
    moe = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K, router=router, norm_topk_prob=norm))
    x = torch.randn(T, D, requires_grad=True)
    nbytes, (y, aux) = saved_bytes(lambda: moe(x), params=list(moe.parameters()))
    P = aux.routing.token_idx_P.numel()
    allowance = T * E * 4 if (router == "expert_choice" or not norm) else 0
    assert nbytes <= 1.1 * (T * D * 4 + P * 2 * F * 4) + 64 * P + allowance


def test_reference_saves_much_more():
    """Sanity check of the measurement: the autograd reference keeps gathered X, A and Y."""
    T, D, F, E, K = 512, 128, 32, 64, 8
    moe = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K))
    x = torch.randn(T, D, requires_grad=True)
    grouped, _ = saved_bytes(lambda: moe(x), params=list(moe.parameters()))
    moe.experts.set_impl("reference")
    reference, _ = saved_bytes(lambda: moe(x), params=list(moe.parameters()))
    assert reference > 2.5 * grouped
