"""gpt-oss exports as llama.cpp's "gpt-oss": every tensor read back equal to the source (sinks, q/k/v/o,
router and expert biases, gate/up split), the sliding window and YaRN metadata, mxfp4 experts as GGML
MXFP4 blocks with the same codes and exponents (GGML's nibble order, decoded by gguf's own numpy
code to moekit's values), the one-line refusals, and (slow tier) llama.cpp's greedy tokens equal
moekit's: float, YaRN, and mxfp4 experts."""

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
from moekit.quantize import get_format  # noqa: E402
from moekit.quantize.transform import quantize_model  # noqa: E402
from test_gguf import field, llama_cpp_greedy, moekit_greedy, read, tokenizer  # noqa: E402,F401

OSS = {**MODEL_PRESETS["gpt-oss-tiny"], "vocab_size": 320, "sliding_window": 3}
YARN = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0}


def oss_model(tokenizer, mxfp4=False, **changes):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**OSS, **changes})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name or "norm" in name:
                p.uniform_(-0.5, 0.5) if "norm" not in name else p.uniform_(0.5, 1.5)
    if mxfp4:
        quantize_model(model, "mxfp4", experts_only=True)
    model.tokenizer = tokenizer
    return model


def source_tensors(model):
    """Each GGUF tensor's float source, names mapped by hand (experts: float models only)."""
    sd = {k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()}
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    F = model.cfg.moe.d_expert
    for i in range(model.cfg.n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for g, m in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
            out[b + f"attn_{g}.weight"], out[b + f"attn_{g}.bias"] = sd[p + f"attn.{m}.weight"], sd[p + f"attn.{m}.bias"]
        out[b + "attn_sinks.weight"] = sd[p + "attn.sinks"]
        out[b + "attn_norm.weight"] = sd[p + "attn_norm.weight"]
        out[b + "post_attention_norm.weight"] = sd[p + "ffn_norm.weight"]
        out[b + "ffn_gate_inp.weight"], out[b + "ffn_gate_inp.bias"] = sd[p + "ffn.router.weight"], sd[p + "ffn.router.bias"]
        b13 = sd[p + "ffn.experts.b13"]
        out[b + "ffn_gate_exps.bias"], out[b + "ffn_up_exps.bias"] = b13[:, :F], b13[:, F:]
        out[b + "ffn_down_exps.bias"] = sd[p + "ffn.experts.b2"]
        if p + "ffn.experts.w13" in sd:
            w13 = sd[p + "ffn.experts.w13"]
            out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = w13[:, :F], w13[:, F:]
            out[b + "ffn_down_exps.weight"] = sd[p + "ffn.experts.w2"]
    return out


def test_every_tensor_and_the_metadata_read_back(tmp_path, tokenizer):
    model = oss_model(tokenizer, rope_scaling=YARN)
    assert export_gguf(model, tmp_path / "m.gguf", "f32") == "gpt-oss"
    reader, tensors = read(tmp_path / "m.gguf")
    expected = source_tensors(model)
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(np.asarray(tensors[name].data).reshape(w.shape), w.numpy()), name
    a = "gpt-oss"
    want = {"general.architecture": a, f"{a}.attention.sliding_window": 3, f"{a}.expert_count": 8,
            f"{a}.expert_used_count": 2, f"{a}.expert_feed_forward_length": 32, f"{a}.attention.key_length": 16,
            f"{a}.rope.dimension_count": 16, f"{a}.rope.scaling.type": "yarn",
            f"{a}.rope.scaling.original_context_length": 16}
    for key, value in want.items():
        assert field(reader, key) == value, key
    # moekit keeps transformers' YaRN cos/sin factor folded into q and k: llama.cpp's own is cancelled
    assert field(reader, f"{a}.rope.scaling.attn_factor") == pytest.approx(1 / (0.1 * math.log(32) + 1))


def ggml_mxfp4_codes(blocks):
    """Hand-decoded GGML block_mxfp4 bytes (..., 17): exponent, and the 32 codes in element order
    (byte j: element j low nibble, element j + 16 high nibble)."""
    qs = blocks[..., 1:]
    return blocks[..., 0], np.concatenate([qs & 15, qs >> 4], axis=-1)


@pytest.mark.parametrize("file_type", ["f32", "q8_0"])
def test_mxfp4_experts_written_as_ggml_mxfp4_blocks(tmp_path, tokenizer, file_type):
    model = oss_model(tokenizer, mxfp4=True)
    export_gguf(model, tmp_path / "m.gguf", file_type)
    _, tensors = read(tmp_path / "m.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType[file_type.upper()]
    fmt = get_format("mxfp4")
    for i, layer in enumerate(model.layers):
        experts, F = layer.ffn.experts, model.cfg.moe.d_expert
        for name, weight, rows in (("gate", experts.w13, slice(0, F)), ("up", experts.w13, slice(F, 2 * F)),
                                   ("down", experts.w2, slice(None))):
            t = tensors[f"blk.{i}.ffn_{name}_exps.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.MXFP4
            qweight, scale = weight.qweight[:, rows].numpy(), weight.scale[:, rows].numpy()
            E, N, K = qweight.shape[0], qweight.shape[1], qweight.shape[2] * 2
            assert tuple(int(n) for n in t.shape[::-1]) == (E, N, K)
            data = np.asarray(t.data).reshape(E, N, K // 32, 17)
            exps, codes = ggml_mxfp4_codes(data)
            assert np.array_equal(exps, scale)  # byte-equal exponents
            ours = qweight.reshape(E, N, K // 32, 16)
            assert np.array_equal(codes[..., 0::2], ours & 15) and np.array_equal(codes[..., 1::2], ours >> 4)
            theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(E, N, K)
            packed = {"qweight": weight.qweight[:, rows], "scale": weight.scale[:, rows]}
            assert np.array_equal(theirs, fmt.dequantize(packed, K).numpy())


@pytest.mark.parametrize("changes, message", [
    (dict(layer_types=("full", "sliding")), "slides on even layers"),
    (dict(moe={**OSS["moe"], "swiglu_alpha": 1.5}), "alpha 1.702, limit 7.0"),
    (dict(rotary_dim=8), "rotary_dim=8"),
    (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "rope_scaling 'llama3'"),
])
def test_unexportable_gpt_oss_refused(tmp_path, tokenizer, changes, message):
    model = oss_model(tokenizer, **changes)
    with pytest.raises(ValueError, match=message):
        export_gguf(model, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"rope_scaling": YARN, "rope_theta": 150000.0},
                                     {"rope_scaling": {**YARN, "truncate": False}, "rope_theta": 150000.0},
                                     {"mxfp4": True}], ids=["plain", "yarn", "yarn-untruncated", "mxfp4"])
def test_llama_cpp_greedy_equals_moekit(tmp_path, tokenizer, changes):
    """Prompt + 12 tokens run past the window of 3 (sliding layers masked); f32 with mxfp4 experts
    (llama.cpp's CPU MXFP4 kernel rounds the activations to q8_0: equal tokens at this size)."""
    model = oss_model(tokenizer, init_std=0.3, **changes)
    export_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = tokenizer.encode("def f(x):\n").ids
    assert llama_cpp_greedy(tmp_path / "m.gguf", prompt) == moekit_greedy(model, prompt)
