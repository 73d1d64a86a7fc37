"""Static-shape decode step (`Transformer.decode_step`, `generate(compile=True)`).

Fast tier: the static step run eagerly (not compiled) gives the same greedy tokens as
the eager `generate`, across the architecture features. Slow tier: torch.compile'd.
"""

import pytest
import torch

from moekit import ModelConfig, MoEConfig, Transformer
from moekit import generate as gen_mod
from moekit.generate import generate

PROMPTS = [[5, 17, 300, 42, 7, 99, 1], [8, 3], [250, 251, 252, 253], [11]]
MOE = dict(d_model=64, d_expert=32, num_experts=8, top_k=2)

CONFIGS = {
    "tiny": {},
    "qk_norm_full_bias_clip_mha": dict(qk_norm="full", attention_bias=True, clip_qkv=0.5, n_kv_heads=4),
    "mqa_no_qk_norm_tied": dict(qk_norm=None, n_kv_heads=1, tie_embeddings=True),
    "shared_gated_expert_softmax_unnormalised": dict(
        moe=MoEConfig(**MOE, num_shared_experts=1, shared_gate=True, norm_topk_prob=False)),
    "shared_expert_topk_softmax": dict(moe=MoEConfig(**MOE, num_shared_experts=2, router="topk_softmax")),
    "sigmoid_groups_dense_first": dict(
        n_layers=3, first_k_dense=1,
        moe=MoEConfig(**MOE, router="sigmoid_topk", num_groups=4, topk_groups=2, routed_scaling_factor=2.5)),
    "hash_sparse_step": dict(n_layers=3, sparse_step=2, moe=MoEConfig(**MOE, router="hash", hash_vocab_size=512)),
    "all_dense": dict(moe=None),
    "many_pairs_top4": dict(moe=MoEConfig(**{**MOE, "num_experts": 4, "top_k": 3})),  # T*K > E: dense expert path
}


def make_model(**overrides) -> Transformer:
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.preset("tiny", **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # well-separated logits: no near-ties for argmax
        for moe in model.moe_layers():
            moe.router.expert_bias.normal_(0, 0.05)  # selection-only bias must be honoured
    return model.eval()


@pytest.fixture
def eager_static_step(monkeypatch):
    """generate(compile=True) with the static step run eagerly (no torch.compile)."""
    monkeypatch.setattr(gen_mod, "compiled_decode_step", lambda model: model.decode_step)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_static_step_gives_eager_greedy_tokens(name, eager_static_step):
    model = make_model(**CONFIGS[name])
    expected = generate(model, PROMPTS, max_new_tokens=10)
    assert generate(model, PROMPTS, max_new_tokens=10, compile=True) == expected
    assert generate(model, PROMPTS[:1], max_new_tokens=10, compile=True) == expected[:1]  # batch 1, no padding


def test_static_step_logits_match_eager_forward():
    model = make_model(**CONFIGS["sigmoid_groups_dense_first"])
    tok = torch.randint(0, 512, (2, 9))
    with torch.inference_mode():
        full = model(tok)[:, -1]
        cache = model.new_cache(2, 16)
        model(tok[:, :8], cache=cache, start=0)
        step = model.decode_step(tok[:, 8:], torch.full((2, 1), 8), torch.tensor([8, 8]),
                                 torch.ones(2, 16, dtype=torch.bool), cache)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_static_step_with_stops_and_penalty(eager_static_step):
    model = make_model()
    kwargs = dict(max_new_tokens=12, repetition_penalty=1.3)
    free = generate(model, PROMPTS, **kwargs)
    stop = [free[0][3], free[2][5]]
    assert generate(model, PROMPTS, stop=stop, compile=True, **kwargs) == generate(model, PROMPTS, stop=stop, **kwargs)


def test_static_step_checks_hash_table_range(eager_static_step):
    model = make_model(moe=MoEConfig(**MOE, router="hash", hash_vocab_size=16))
    with pytest.raises(ValueError, match="hash_vocab_size=16"):
        generate(model, [[1, 2]], max_new_tokens=8, compile=True)


def test_compile_rejects_token_rounding():
    model = make_model(moe=MoEConfig(**MOE, token_rounding="nearest"))
    with pytest.raises(ValueError, match="token_rounding"):
        generate(model, [[1, 2]], max_new_tokens=2, compile=True)


@pytest.mark.slow
def test_compiled_generate_equals_eager_on_tiny():
    model = make_model()
    expected = generate(model, PROMPTS, max_new_tokens=12)
    assert generate(model, PROMPTS, max_new_tokens=12, compile=True) == expected
    assert generate(model, PROMPTS, max_new_tokens=12, compile=True) == expected  # cached compiled step
    assert generate(model, PROMPTS[:1], max_new_tokens=12, compile=True) == expected[:1]
