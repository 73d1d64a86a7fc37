"""Grouped vs reference at larger sizes, where `auto` picks a padded grid with a compact tail."""

import copy

import pytest
import torch

from moekit.moe import MoE, MoEConfig
from moekit.moe.gmm import choose_block



@pytest.mark.parametrize("shape", [(1024, 256, 64, 64, 8), (2048, 128, 32, 128, 8)], ids=str)
def test_auto_layout_at_scale(shape):
    T, D, F, E, K = shape
    moe = MoE(MoEConfig(d_model=D, d_expert=F, num_experts=E, top_k=K, num_shared_experts=1))
    x = torch.randn(T, D)
    g = torch.randn(T, D)
    _, aux = moe(x)
    block = choose_block(aux.tokens_per_expert, x.device)
    assert 0 < block < aux.tokens_per_expert.max()  # a grid plus a compact tail
    outs = []
    for impl in ("reference", "grouped"):
        m = copy.deepcopy(moe)
        m.experts.set_impl(impl, "auto")
        xr = x.clone().requires_grad_(True)
        y, _ = m(xr)
        (y * g).sum().backward()
        outs.append((y.detach(), xr.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx1, dx0, rtol=1e-4, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-4, msg=name)
