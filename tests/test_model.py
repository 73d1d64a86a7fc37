"""The decoder: causality, KV-cache equivalence, dense/MoE layer placement, presets, errors."""

import pytest
import torch

from moekit import ModelConfig, MoEConfig, Transformer


def test_logits_are_causal():
    model = Transformer(ModelConfig.preset("tiny")).eval()
    tok = torch.randint(0, 512, (2, 12))
    changed = tok.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 512
    with torch.no_grad():
        a, b = model(tok), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_kv_cache_decoding_equals_full_forward(preset):
    model = Transformer(ModelConfig.preset(preset)).eval()
    tok = torch.randint(0, model.cfg.vocab_size, (3, 15))
    with torch.no_grad():
        full = model(tok)
        cache = model.new_cache(3, 20)
        steps = [model(tok[:, :9], cache=cache, start=0)]
        steps += [model(tok[:, i:i + 1], cache=cache, start=i) for i in range(9, 15)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_left_padding_with_key_mask_matches_unpadded():
    model = Transformer(ModelConfig.preset("tiny")).eval()
    tok = torch.randint(1, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tok], 1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(tok)
        out = model(padded, positions_BT=positions, key_mask_BS=mask)
    torch.testing.assert_close(out[:, 3:], ref, rtol=1e-4, atol=1e-5)


def test_dense_layer_placement():
    moe = MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2)
    cfg = ModelConfig(d_model=32, n_layers=6, n_heads=4, moe=moe, first_k_dense=1, sparse_step=2, dense_layers=(5,))
    assert [cfg.is_dense_layer(i) for i in range(6)] == [True, False, True, False, True, True]
    model = Transformer(cfg)
    assert [b.is_moe for b in model.layers] == [False, True, False, True, False, False]
    tok = torch.randint(0, 512, (2, 5))
    model(tok)
    aux = model.moe_aux()
    assert len(aux.tokens_per_expert) == 2 and all(int(t.sum()) == 2 * 5 * 2 for t in aux.tokens_per_expert)


def test_tied_embeddings_and_param_counts():
    cfg = ModelConfig.preset("tiny", tie_embeddings=True)
    model = Transformer(cfg)
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    moe = cfg.moe
    per_expert = 3 * moe.d_model * moe.d_expert
    assert model.num_params() - model.num_params(active=True) == cfg.n_layers * (moe.num_experts - moe.top_k) * per_expert


@pytest.mark.parametrize("name,total,active", [
    ("qwen3-30b-a3b", 30.53e9, 3.35e9), ("mixtral-8x7b", 46.70e9, 12.88e9),
    ("olmoe-1b-7b", 6.919e9, 1.282e9), ("qwen2-57b-a14b", 57.41e9, 14.25e9),
])
def test_real_presets_build_on_meta(name, total, active):
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset(name))
    assert model.embed.weight.device.type == "meta"
    assert model.num_params() == pytest.approx(total, rel=1e-3)
    assert model.num_params(active=True) == pytest.approx(active, rel=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
    (dict(qk_norm="weird"), "unknown qk_norm"),
    (dict(first_k_dense=9, n_layers=2), "first_k_dense=9"),
    (dict(dense_layers=(0, 5), n_layers=2), r"outside \[0, 2\)"),
    (dict(moe=MoEConfig(d_model=32)), "differs from the model's d_model=64"),
    (dict(moe=MoEConfig(d_model=64, router="expert_choice")), "not causal"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_bad_tokens():
    model = Transformer(ModelConfig.preset("tiny"))
    with pytest.raises(ValueError, match="vocab_size=512"):
        model(torch.tensor([[0, 512]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="max_seq_len=256"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        ModelConfig.preset("nope")
