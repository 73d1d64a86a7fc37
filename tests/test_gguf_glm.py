"""GLM-4.5's layout (glm-tiny: partial rotary, q/k/v biases, per-head q/k norm, a dense first layer,
sigmoid router with a selection bias, a shared expert) exports as llama.cpp's glm4moe with
rope.dimension_count = rotary_dim; llama.cpp's greedy tokens equal moekit's (slow tier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from moekit import ModelConfig, Transformer  # noqa: E402
from moekit.gguf_export import export_gguf  # noqa: E402
from moekit.presets import MODEL_PRESETS  # noqa: E402
from test_gguf import field, llama_cpp_greedy, moekit_greedy, read, tokenizer  # noqa: E402,F401

GLM = {**MODEL_PRESETS["glm-tiny"], "vocab_size": 320}


def glm_model(tokenizer, **changes):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**GLM, **changes})).eval()
    with torch.no_grad():
        for layer in model.layers:
            for proj in (layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj):
                proj.bias.uniform_(-0.5, 0.5)
            if layer.is_moe:
                layer.ffn.router.expert_bias.uniform_(-0.1, 0.1)
    model.tokenizer = tokenizer
    return model


def test_partial_rotary_and_biases_read_back(tmp_path, tokenizer):
    model = glm_model(tokenizer)
    assert export_gguf(model, tmp_path / "m.gguf", "f32") == "glm4moe"
    reader, tensors = read(tmp_path / "m.gguf")
    assert field(reader, "glm4moe.rope.dimension_count") == 8  # rotary_dim, not head_dim 16
    assert field(reader, "glm4moe.attention.key_length") == 16
    sd = model.state_dict()
    for i in range(model.cfg.n_layers):
        for name in ("q", "k", "v"):
            for kind in ("weight", "bias"):  # unpermuted: glm4moe rotates halves as moekit does
                got = tensors[f"blk.{i}.attn_{name}.{kind}"].data
                assert np.array_equal(got.reshape(sd[f"layers.{i}.attn.{name}_proj.{kind}"].shape),
                                      sd[f"layers.{i}.attn.{name}_proj.{kind}"].numpy())
    assert np.array_equal(tensors["blk.1.exp_probs_b.bias"].data, sd["layers.1.ffn.router.expert_bias"].numpy())


def test_partial_rotary_refused_for_the_llama_layout(tmp_path, tokenizer):
    model = Transformer(ModelConfig(vocab_size=320, d_model=64, n_heads=4, head_dim=16, rotary_dim=8))
    model.tokenizer = tokenizer
    with pytest.raises(ValueError, match="rotary_dim=8: llama.cpp's llama architecture rotates whole heads"):
        export_gguf(model, tmp_path / "m.gguf", "f32")


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"init_std": 0.3}], ids=["init", "wide"])
def test_llama_cpp_greedy_equals_moekit(tmp_path, tokenizer, changes):
    model = glm_model(tokenizer, **changes)
    export_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = tokenizer.encode("def f(x):\n").ids
    assert llama_cpp_greedy(tmp_path / "m.gguf", prompt) == moekit_greedy(model, prompt)
