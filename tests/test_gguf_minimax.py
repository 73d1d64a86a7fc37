"""MiniMax-M2 exports as llama.cpp's "minimax-m2": every tensor read back equal to its source (full-width
q/k norms, the selection bias as exp_probs_b, gate/up split, output.weight always), the metadata
(sigmoid gating, experts sized by feed_forward_length, partial rotary), one-line refusals, and (slow
tier) llama.cpp's greedy tokens equal moekit's with logits within float rounding."""

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
from test_gguf_qwen3next import llama_cpp_logits  # noqa: E402

MINIMAX = {**MODEL_PRESETS["minimax-tiny"], "vocab_size": 320}


def minimax_model(tokenizer, **changes):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**MINIMAX, **changes})).eval()
    with torch.no_grad():  # norms away from 1, a selection bias that changes the top-k
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0, 0.3)
        for layer in model.layers:
            if layer.is_moe:
                layer.ffn.router.expert_bias.uniform_(-0.1, 0.1)
    model.tokenizer = tokenizer
    return model


def source_tensors(model):
    sd = {k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()}
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"],
           "output.weight": sd.get("lm_head.weight", sd["embed.weight"])}
    F = model.cfg.moe.d_expert
    for i in range(model.cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for g, m in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
            out[b + f"attn_{g}.weight"] = sd[p + f"attn.{m}.weight"]
        out[b + "attn_q_norm.weight"] = sd[p + "attn.q_norm.weight"]  # (n_heads * head_dim,)
        out[b + "attn_k_norm.weight"] = sd[p + "attn.k_norm.weight"]
        out[b + "attn_norm.weight"], out[b + "ffn_norm.weight"] = sd[p + "attn_norm.weight"], sd[p + "ffn_norm.weight"]
        out[b + "ffn_gate_inp.weight"] = sd[p + "ffn.router.weight"]
        out[b + "exp_probs_b.bias"] = sd[p + "ffn.router.expert_bias"]
        w13 = sd[p + "ffn.experts.w13"]
        out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = w13[:, :F], w13[:, F:]
        out[b + "ffn_down_exps.weight"] = sd[p + "ffn.experts.w2"]
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_every_tensor_and_the_metadata_read_back(tmp_path, tokenizer, tie):
    model = minimax_model(tokenizer, tie_embeddings=tie)
    assert export_gguf(model, tmp_path / "m.gguf", "f32") == "minimax-m2"
    reader, tensors = read(tmp_path / "m.gguf")
    expected = source_tensors(model)
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        assert np.array_equal(np.asarray(tensors[name].data).reshape(w.shape), w.numpy()), name
    a = "minimax-m2"
    want = {f"{a}.feed_forward_length": 32, f"{a}.expert_feed_forward_length": 32, f"{a}.expert_count": 8,
            f"{a}.expert_used_count": 2, f"{a}.rope.dimension_count": 8, f"{a}.attention.key_length": 16,
            f"{a}.expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID)}
    for key, value in want.items():
        assert field(reader, key) == value, key


@pytest.mark.parametrize("changes, message", [
    (dict(moe={**MINIMAX["moe"], "routed_scaling_factor": 2.5}), "routed_scaling_factor=2.5"),
    (dict(moe={**MINIMAX["moe"], "norm_topk_prob": False}), "norm_topk_prob=False"),
    (dict(moe={**MINIMAX["moe"], "num_shared_experts": 1}), "shared experts"),
    (dict(first_k_dense=1), "MoE in every layer"),
    (dict(attention_bias=True), "attention biases"),
])
def test_unexportable_minimax_refused(tmp_path, tokenizer, changes, message):
    model = minimax_model(tokenizer, **changes)
    with pytest.raises(ValueError, match=message):
        export_gguf(model, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_greedy_equals_moekit(tmp_path, tokenizer):
    model = minimax_model(tokenizer)
    export_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = tokenizer.encode("def f(x):\n    return x + 1\nthe quick").ids
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(llama_cpp_logits(tmp_path / "m.gguf", prompt) - ours).max() < 0.05
    assert llama_cpp_greedy(tmp_path / "m.gguf", prompt) == moekit_greedy(model, prompt)
