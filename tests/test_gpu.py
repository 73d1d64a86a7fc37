"""CUDA checks of the grouped backend (marked gpu: skipped without a GPU, not in the fast tier)."""

import copy

import pytest
import torch

from moekit.moe import MoE, MoEConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_grouped_matches_reference_on_cuda(dtype, router):
    cfg = MoEConfig(d_model=96, d_expert=48, num_experts=16, top_k=4, router=router, num_shared_experts=1)
    moe64 = MoE(cfg).double()
    x64 = torch.randn(2, 37, 96, dtype=torch.float64)
    g64 = torch.randn_like(x64)

    def run(moe, impl, x, g):
        moe = copy.deepcopy(moe)
        moe.experts.set_impl(impl)
        x = x.clone().requires_grad_(True)
        y, _ = moe(x)
        (y * g).sum().backward()
        return y.detach().double().cpu(), {n: p.grad.double().cpu() for n, p in moe.named_parameters()}

    y_ref64, gr_ref64 = run(moe64, "reference", x64, g64)
    moe_lo = copy.deepcopy(moe64).to("cuda", dtype)
    x, g = x64.to("cuda", dtype), g64.to("cuda", dtype)
    y_ref, gr_ref = run(moe_lo, "reference", x, g)
    y_new, gr_new = run(moe_lo, "grouped", x, g)

    def err(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    atol = 1e-6 if dtype == torch.float32 else 1e-2
    assert err(y_new, y_ref64) <= 2 * err(y_ref, y_ref64) + atol
    for name in gr_ref64:
        assert err(gr_new[name], gr_ref64[name]) <= 2 * err(gr_ref[name], gr_ref64[name]) + atol, name
