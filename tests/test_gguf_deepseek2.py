"""DeepSeek-V3's layout (mla-tiny: MLA with q_lora, a dense first layer, sigmoid group routing with a
selection bias, routed scaling, a shared expert) exports as llama.cpp's "deepseek2": kv_b_proj split
per head into attn_k_b (the key half transposed) and attn_v_b, absorbed-MLA metadata (one KV head of
latent + rope), the metadata of the router; llama.cpp's greedy tokens equal moekit's (slow tier),
also with q_proj and rotate-half RoPE (rows permuted to llama.cpp's pairs). YaRN (DeepSeek-V3 / Kimi
K2): the rope.scaling keys and yarn_log_multiplier = 0.1 * mscale_all_dim read back, the cos/sin
attention_factor folded into the rotary weight rows, and llama.cpp's logits over a prompt past the
original context equal moekit's (slow tier, f32 KV cache), with mscale == mscale_all_dim and without."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from moekit import ModelConfig, Transformer  # noqa: E402
from moekit.gguf_export import export_gguf  # noqa: E402
from moekit.presets import MODEL_PRESETS  # noqa: E402
from test_gguf import field, llama_cpp_greedy, moekit_greedy, read, tokenizer  # noqa: E402,F401

MLA = {**MODEL_PRESETS["mla-tiny"], "vocab_size": 320}
V3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
           "beta_slow": 1.0, "mscale_all_dim": 1.0, "attention_factor": 1.0}  # DeepSeek-V3's config.json


def mla_model(tokenizer, **changes):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**MLA, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for layer in model.layers:
            if layer.is_moe:
                layer.ffn.router.expert_bias.uniform_(-0.1, 0.1)
    model.tokenizer = tokenizer
    return model


def test_mla_tensors_and_metadata_read_back(tmp_path, tokenizer):
    model = mla_model(tokenizer)
    assert export_gguf(model, tmp_path / "m.gguf", "f32") == "deepseek2"
    reader, tensors = read(tmp_path / "m.gguf")
    cfg, sd = model.cfg, model.state_dict()
    H, N, V, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    for i in range(cfg.n_layers):
        a, b = f"layers.{i}.attn.", f"blk.{i}."
        for ours, theirs in (("q_a_proj.weight", "attn_q_a.weight"), ("q_a_layernorm.weight", "attn_q_a_norm.weight"),
                             ("q_b_proj.weight", "attn_q_b.weight"), ("kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
                             ("kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight"), ("o_proj.weight", "attn_output.weight")):
            w = sd[a + ours]  # interleaved RoPE (DeepSeek's layout): rows as they are
            assert np.array_equal(np.asarray(tensors[b + theirs].data).reshape(w.shape), w.numpy()), theirs
        kv_b = sd[a + "kv_b_proj.weight"]  # rows: head h holds N key rows, then V value rows
        k_b, v_b = np.asarray(tensors[b + "attn_k_b.weight"].data), np.asarray(tensors[b + "attn_v_b.weight"].data)
        assert k_b.shape == (H, C, N) and v_b.shape == (H, V, C)
        for h in range(H):
            rows = kv_b[h * (N + V):(h + 1) * (N + V)]
            assert np.array_equal(k_b[h], rows[:N].T.numpy()) and np.array_equal(v_b[h], rows[N:].numpy())
    assert np.array_equal(tensors["blk.1.exp_probs_b.bias"].data, sd["layers.1.ffn.router.expert_bias"].numpy())
    assert "blk.0.ffn_gate.weight" in tensors and "blk.1.ffn_gate_shexp.weight" in tensors
    d = "deepseek2"
    want = {f"{d}.attention.head_count_kv": 1, f"{d}.attention.key_length": C + cfg.qk_rope_head_dim,
            f"{d}.attention.value_length": C, f"{d}.attention.key_length_mla": N + cfg.qk_rope_head_dim,
            f"{d}.attention.value_length_mla": V, f"{d}.attention.kv_lora_rank": C, f"{d}.attention.q_lora_rank": 32,
            f"{d}.rope.dimension_count": cfg.qk_rope_head_dim, f"{d}.leading_dense_block_count": 1,
            f"{d}.expert_group_count": 2, f"{d}.expert_group_used_count": 1, f"{d}.expert_gating_func": 2,
            f"{d}.expert_shared_count": 1, f"{d}.expert_weights_norm": True}
    for key, value in want.items():
        assert field(reader, key) == value, key
    assert field(reader, f"{d}.expert_weights_scale") == pytest.approx(2.5)


@pytest.mark.parametrize("attention_factor", [1.0, 1.25])
def test_yarn_keys_and_folded_rope_rows_read_back(tmp_path, tokenizer, attention_factor):
    model = mla_model(tokenizer, rope_scaling={**V3_YARN, "attention_factor": attention_factor})
    export_gguf(model, tmp_path / "m.gguf", "f32")
    reader, tensors = read(tmp_path / "m.gguf")
    d = "deepseek2"
    assert field(reader, f"{d}.rope.scaling.type") == "yarn"
    assert field(reader, f"{d}.rope.scaling.original_context_length") == 4096
    assert field(reader, f"{d}.rope.scaling.factor") == pytest.approx(40.0)
    assert field(reader, f"{d}.rope.scaling.yarn_log_multiplier") == pytest.approx(0.1)  # 0.1 * mscale_all_dim
    cfg, sd = model.cfg, model.state_dict()
    H, N, R, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    # moekit multiplies the rotated q / k parts by attention_factor; llama.cpp's cos/sin have magnitude 1
    q_b = sd["layers.0.attn.q_b_proj.weight"].view(H, N + R, -1)
    want_q = torch.cat([q_b[:, :N], q_b[:, N:] * attention_factor], dim=1).reshape(H * (N + R), -1)
    kv_a = sd["layers.0.attn.kv_a_proj_with_mqa.weight"]
    want_kv = torch.cat([kv_a[:C], kv_a[C:] * attention_factor])
    got_q, got_kv = (np.asarray(tensors[f"blk.0.{n}.weight"].data) for n in ("attn_q_b", "attn_kv_a_mqa"))
    np.testing.assert_allclose(got_q.reshape(want_q.shape), want_q.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got_kv.reshape(want_kv.shape), want_kv.numpy(), rtol=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(norm_eps=1e-5), "norm_eps=1e-05"),
    (dict(rope_scaling={"type": "linear", "factor": 4.0}), "rope_scaling 'linear'"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "without mscale_all_dim"),
    (dict(rope_scaling={**V3_YARN, "beta_fast": 16.0}), "beta_fast=16"),
    (dict(rope_scaling={**V3_YARN, "truncate": False}), "truncate=False"),
    (dict(rope_scaling={**V3_YARN, "factor": 0.5}), "factor=0.5 < 1"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(dense_layers=(2,)), r"dense layers \[0, 2\]"),
])
def test_unexportable_mla_refused(tmp_path, tokenizer, changes, message):
    with pytest.raises(ValueError, match=message):
        export_gguf(mla_model(tokenizer, **changes), tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": None, "rope_interleave": False}], ids=["q_lora", "q_proj"])
def test_llama_cpp_greedy_equals_moekit(tmp_path, tokenizer, changes):
    model = mla_model(tokenizer, init_std=0.3, **changes)
    export_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = tokenizer.encode("def f(x):\n").ids
    assert llama_cpp_greedy(tmp_path / "m.gguf", prompt) == moekit_greedy(model, prompt)


def mscale(factor, m):  # YaRN's magnitude (DeepSeek's yarn_get_mscale), worked by hand
    return 0.1 * m * math.log(factor) + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mscale_all_dim, attention_factor, changes", [
    (1.0, 1.0, {}),  # DeepSeek-V3 / Kimi K2: mscale == mscale_all_dim == 1
    (0.707, 1.0, {}),  # DeepSeek-V2: mscale == mscale_all_dim == 0.707
    (0.707, mscale(4.0, 1.0) / mscale(4.0, 0.707), {"q_lora_rank": None, "rope_interleave": False}),
], ids=["v3", "v2", "mscale_differs_q_proj"])
def test_llama_cpp_yarn_equals_moekit_past_the_original_context(tmp_path, tokenizer, mscale_all_dim,
                                                                 attention_factor, changes):
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
               "mscale_all_dim": mscale_all_dim, "attention_factor": attention_factor}
    model = mla_model(tokenizer, init_std=0.3, rope_scaling=scaling, **changes)
    export_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = tokenizer.encode("the quick brown fox jumps over the lazy dog\n" * 8).ids[:100]
    assert len(prompt) == 100  # past original_max_position_embeddings=64: the YaRN ramp matters
    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = llama_cpp.GGML_TYPE_F32  # an f32 KV cache: llama.cpp's default f16 one alone moves logits by ~0.03
    logits, tokens = llama_cpp_greedy(tmp_path / "m.gguf", prompt, n_ctx=256, logits_all=True, type_k=f32, type_v=f32)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    np.testing.assert_allclose(logits, ours, atol=2e-3)
    assert tokens == moekit_greedy(model, prompt)
