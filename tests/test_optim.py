"""Muon / AdamW grouping: Newton–Schulz against an SVD oracle, hand-computed steps, grouping, state round trip."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from moekit import ModelConfig, Transformer
from moekit.optim import (
    CombinedOptimizer,
    Muon,
    build_optimizer,
    newton_schulz5,
    param_groups,
)

A, B, C = 3.4445, -4.7750, 2.0315


def quintic5(x: np.ndarray, steps: int = 5) -> np.ndarray:
    """The scalar map the iteration applies to each normalized singular value (float64)."""
    for _ in range(steps):
        x = A * x + B * x**3 + C * x**5
    return x


def rand_matrix(shape, seed, cond=None):
    """Gaussian matrix; with cond, square slices with singular values spread log-uniformly over [1/cond, 1]."""
    g = torch.Generator().manual_seed(seed)
    if cond is None:
        return torch.randn(*shape, generator=g)
    *lead, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(*lead, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*lead, n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64).expand(*lead, k)
    return (U @ torch.diag_embed(s) @ V.mT).float()


SHAPES = [
    ((32, 96), None),       # wide
    ((96, 32), None),       # tall
    ((48, 48), 20.0),       # square, conditioned so every singular value reaches the band
    ((4, 64, 24), None),    # batched tall (experts' w2-like)
    ((3, 16, 40), None),    # batched wide
    ((2, 24, 24), 10.0),    # batched square
]


@pytest.mark.parametrize("shape,cond", SHAPES)
def test_newton_schulz_matches_svd(shape, cond):
    G = rand_matrix(shape, seed=sum(shape), cond=cond)
    out = newton_schulz5(G)
    assert out.shape == G.shape and out.dtype == G.dtype

    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s_norm = S / torch.linalg.matrix_norm(G.double(), keepdim=False)[..., None]
    # exact oracle: same singular vectors, singular values mapped by the scalar quintic
    expected = U @ torch.diag_embed(torch.from_numpy(quintic5(s_norm.numpy()))) @ Vh
    assert (out.double() - expected).abs().max() < 1e-5

    s_out = torch.linalg.svdvals(out.double())
    assert s_out.min() > 0.6 and s_out.max() < 1.21, (s_out.min(), s_out.max())
    assert 0.75 < s_out.mean() < 1.0  # 0.80-0.89 for these inputs
    # close to the exact orthogonal factor U V^T in spectral norm
    err = torch.linalg.matrix_norm(out.double() - U @ Vh, ord=2)
    assert err.max() < 0.35


def test_newton_schulz_band_of_scalar_map():
    # empirical band of five quintic steps for normalized singular values in [0.002, 1]
    y = quintic5(np.logspace(math.log10(0.002), 0, 100_000))
    assert 0.68 < y.min() < 0.69 and 1.19 < y.max() < 1.21
    # invariant band the iteration settles into
    z = quintic5(np.linspace(0.05, 1.0, 10_000), steps=60)
    assert 0.68 < z.min() and z.max() < 1.14


def test_newton_schulz_dtype_zero_and_errors():
    G = rand_matrix((16, 8), seed=0).to(torch.bfloat16)
    out = newton_schulz5(G)
    assert out.dtype == torch.bfloat16 and out.shape == (16, 8)
    assert torch.equal(newton_schulz5(torch.zeros(4, 6)), torch.zeros(4, 6))
    with pytest.raises(ValueError):
        newton_schulz5(torch.ones(5))


def test_muon_step_by_hand():
    torch.manual_seed(0)
    w0 = torch.randn(2, 3)
    g1, g2 = torch.randn(2, 3), torch.randn(2, 3)
    lr, mom, wd = 0.1, 0.9, 0.5
    p = nn.Parameter(w0.clone())
    opt = Muon([p], lr=lr, momentum=mom, nesterov=True, weight_decay=wd)

    def ns(x):  # independent restatement of the iteration on the 2x3 (wide) matrix
        x = x.double() / (x.double().norm() + 1e-7)
        for _ in range(5):
            a_ = x @ x.T
            x = A * x + (B * a_ + C * a_ @ a_) @ x
        return x

    scale = math.sqrt(max(1, 2 / 3))  # = 1 for a wide matrix
    w = w0.double()
    buf = torch.zeros(2, 3, dtype=torch.float64)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
        buf = mom * buf + g.double()
        upd = g.double() + mom * buf
        w = w * (1 - lr * wd) - lr * scale * ns(upd)
        assert torch.allclose(p.detach().double(), w, atol=1e-5)
    assert torch.allclose(opt.state[p]["momentum_buffer"].double(), buf, atol=1e-6)

    # tall: scaled by sqrt(rows / cols); without nesterov the update is the buffer
    q = nn.Parameter(torch.zeros(3, 2))
    opt2 = Muon([q], lr=1.0, momentum=0.5, nesterov=False)
    gt = torch.randn(3, 2)
    for _ in range(2):
        q.grad = gt.clone()
        opt2.step()
    # buffers: g, then 1.5 g -> updates NS(g) + NS(1.5 g) = 2 NS(g) (NS is scale invariant)
    expected = -math.sqrt(3 / 2) * 2 * ns(gt.T).T
    assert torch.allclose(q.detach().double(), expected, atol=1e-5)


def test_muon_rejects_vectors():
    with pytest.raises(ValueError):
        Muon([nn.Parameter(torch.ones(4))])


def test_muon_3d_experts_independent():
    torch.manual_seed(1)
    E, M, N = 4, 12, 5
    w = torch.randn(E, M, N)
    g = torch.randn(E, M, N)
    g[2] *= 100.0  # scale of one expert must not affect the others
    p3 = nn.Parameter(w.clone())
    opt3 = Muon([p3], lr=0.05)
    p3.grad = g.clone()
    opt3.step()
    slices = []
    for e in range(E):
        pe = nn.Parameter(w[e].clone())
        opt = Muon([pe], lr=0.05)
        pe.grad = g[e].clone()
        opt.step()
        slices.append(pe.detach())
    assert torch.allclose(p3.detach(), torch.stack(slices), atol=1e-6)
    assert torch.allclose(newton_schulz5(g), torch.stack([newton_schulz5(g[e]) for e in range(E)]), atol=1e-6)


def _names(items):
    return {n for n, _ in items}


def test_param_groups_tiny_transformer():
    cfg = ModelConfig.preset("tiny")
    cfg = cfg.replace(tie_embeddings=True, first_k_dense=1,
                      moe=cfg.moe.replace(num_shared_experts=1, shared_gate=True, router_noise=True))
    model = Transformer(cfg)
    groups = param_groups(model)
    muon, adamw = _names(groups["muon"]), _names(groups["adamw"])
    assert not muon & adamw
    for name in ("layers.0.attn.q_proj.weight", "layers.1.attn.o_proj.weight",
                 "layers.0.ffn.w13", "layers.0.ffn.w2",  # dense layer
                 "layers.1.ffn.experts.w13", "layers.1.ffn.experts.w2",
                 "layers.1.ffn.shared.w13", "layers.1.ffn.shared.w2"):
        assert name in muon, name
    for name in ("embed.weight", "norm.weight", "layers.0.attn_norm.weight", "layers.1.ffn_norm.weight",
                 "layers.0.attn.q_norm.weight", "layers.1.ffn.router.weight",
                 "layers.1.ffn.router.noise_weight", "layers.1.ffn.shared_gate.weight"):
        assert name in adamw, name
    # tied head: counted once (under the embedding's name)
    assert "lm_head.weight" not in muon | adamw
    all_params = [p for _, p in groups["muon"] + groups["adamw"]]
    assert len(all_params) == len({id(p) for p in all_params}) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for _, p in groups["muon"])

    untied = param_groups(Transformer(ModelConfig.preset("tiny")))
    assert "lm_head.weight" in _names(untied["adamw"]) and "embed.weight" in _names(untied["adamw"])


def test_build_optimizer_description_and_groups():
    model = Transformer(ModelConfig.preset("tiny"))
    opt, desc = build_optimizer(model, kind="muon", lr=1e-3, weight_decay=0.1, muon_lr=0.02)
    assert set(opt.optimizers) == {"muon", "adamw"}
    assert isinstance(opt.optimizers["muon"], Muon)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["muon", "adamw_decay", "adamw_no_decay"]
    for g in opt.param_groups:
        assert g["base_lr"] == g["lr"]
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["muon"]["lr"] == 0.02 and by_name["adamw_decay"]["lr"] == 1e-3
    assert by_name["adamw_no_decay"]["weight_decay"] == 0.0 and by_name["adamw_decay"]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in by_name["adamw_no_decay"]["params"])
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == model.num_params()
    assert "layers.*.attn.q_proj.weight x2" in desc and "layers.*.ffn.experts.w13 x2" in desc
    assert f"{model.num_params():,}" in desc

    opt_a, desc_a = build_optimizer(model, kind="adamw")
    assert set(opt_a.optimizers) == {"adamw"} and "muon" not in [g["name"] for g in opt_a.param_groups]
    decay = {id(p) for g in opt_a.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.layers[0].ffn.experts.w13) in decay and id(model.norm.weight) not in decay
    assert "adamw_decay" in desc_a


def test_unknown_kind():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(nn.Linear(2, 2), kind="sgd")


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.experts = nn.Parameter(torch.randn(3, 16, 8) * 0.1)
        self.lm_head = nn.Linear(8, 1)

    def forward(self, ids, x):
        h = self.norm(torch.relu(self.hidden(x + self.embed(ids))))
        return self.lm_head(torch.einsum("bi,eij->bj", h, self.experts) / 3)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (32,), generator=g)
    x = torch.randn(32, 8, generator=g)
    return ids, x, x.sum(dim=1, keepdim=True) * 0.5


def _train(model, opt, seeds):
    losses = []
    for s in seeds:
        ids, x, y = _batch(s)
        loss = nn.functional.mse_loss(model(ids, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_bit_exact():
    torch.manual_seed(0)
    model = _Tiny()
    opt, _ = build_optimizer(model, kind="muon", lr=1e-2, muon_lr=0.02)
    _train(model, opt, range(3))
    model_sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt_sd = copy.deepcopy(opt.state_dict())  # torch returns live references to the state
    ref_losses = _train(model, opt, range(3, 6))
    ref_params = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)
    model2 = _Tiny()
    model2.load_state_dict(model_sd)
    opt2, _ = build_optimizer(model2, kind="muon", lr=5.0, muon_lr=5.0)  # hyperparameters come from the state
    opt2.load_state_dict(opt_sd)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert _train(model2, opt2, range(3, 6)) == ref_losses
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref_params[k]), k

    with pytest.raises(ValueError):
        opt2.load_state_dict({"adamw": opt_sd["adamw"]})


def test_build_optimizer_muon_trains():
    torch.manual_seed(0)
    model = _Tiny()
    opt, _ = build_optimizer(model, kind="muon", lr=1e-2, muon_lr=0.02)
    assert isinstance(opt, CombinedOptimizer)
    muon_params = {id(p) for p in opt.optimizers["muon"].param_groups[0]["params"]}
    assert muon_params == {id(model.hidden.weight), id(model.experts)}
    losses = _train(model, opt, [0] * 15)
    assert losses[-1] < 0.5 * losses[0], losses
    # a scheduler scales lr from base_lr
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * 0.5
    assert opt.optimizers["muon"].param_groups[0]["lr"] == 0.01
