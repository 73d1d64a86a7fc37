"""Block-FP8 checkpoints (DeepSeek-V3 / Kimi K2: `weight` float8_e4m3fn with a float32 `weight_scale_inv`
per block, quantization_config fp8 with weight_block_size): a tiny deepseek_v3 checkpoint quantized here
(blocks of 16 x 8 so that edge blocks are partial) loads as the block-by-block dequantized weights, with
the logits of transformers' model holding them."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from moekit.hf import load_hf  # noqa: E402

BLOCK = (16, 8)
VOCAB = 73
HF_KW = dict(attn_implementation="eager", experts_implementation="eager")
CONFIG = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, moe_intermediate_size=18, num_hidden_layers=2,
              num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=4,
              num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=20, q_lora_rank=24, qk_rope_head_dim=6,
              qk_nope_head_dim=10, v_head_dim=11, first_k_dense_replace=1, max_position_embeddings=64)


def quantize_blocks(w_NK):
    """(fp8 weight, scale_inv) with one scale per BLOCK (amax / 448), edge blocks partial."""
    N, K = w_NK.shape
    n, k = math.ceil(N / BLOCK[0]), math.ceil(K / BLOCK[1])
    scale = torch.empty(n, k)
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(n):
        for j in range(k):
            rows, cols = slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])
            scale[i, j] = w_NK[rows, cols].abs().max().clamp(min=1e-12) / 448.0
            q[rows, cols] = (w_NK[rows, cols] / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blocks(q_NK, scale):
    """The reference: each block's fp8 values times its scale, one block at a time."""
    out = torch.empty(q_NK.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1])
            out[rows, cols] = q_NK[rows, cols].float() * scale[i, j]
    return out


def quantized(key, t):
    """The weights DeepSeek-V3 ships in FP8: linear layers, not the embeddings, head, norms or router."""
    skip = ("embed_tokens", "lm_head", "norm", "layernorm", "mlp.gate.weight")
    return key.endswith(".weight") and t.dim() == 2 and not any(s in key for s in skip)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_mla import randomize

    cfg = transformers.DeepseekV3Config(**CONFIG)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM._from_config(cfg, **HF_KW).eval()
    randomize(model)
    src = tmp_path_factory.mktemp("bf16")
    model.save_pretrained(src)
    state = safetensors_torch.load_file(str(src / "model.safetensors"))
    out, reference = {}, {}
    for key, t in state.items():
        if quantized(key, t):
            q, scale = quantize_blocks(t.float())
            out[key], out[key + "_scale_inv"] = q, scale
            reference[key] = dequantize_blocks(q, scale)
        else:
            out[key] = t
    assert len(reference) > 20
    path = tmp_path_factory.mktemp("fp8")
    safetensors_torch.save_file(out, str(path / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (path / "config.json").write_text(json.dumps(config))
    dequantized = tmp_path_factory.mktemp("dequantized")  # transformers' model with the reference weights
    safetensors_torch.save_file({**state, **reference}, str(dequantized / "model.safetensors"),
                                metadata={"format": "pt"})
    (dequantized / "config.json").write_text((src / "config.json").read_text())
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(dequantized, **HF_KW).eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return path, reference, ids, hf(ids).logits


def test_fp8_blocks_load_dequantized(fp8_checkpoint):
    path, reference, ids, ref_logits = fp8_checkpoint
    model = load_hf(path, dtype="float32")
    state = model.state_dict()
    attn = model.layers[1].attn
    assert torch.equal(attn.kv_b_proj.weight, reference["model.layers.1.self_attn.kv_b_proj.weight"])
    assert torch.equal(state["layers.1.ffn.experts.w2"][2], reference["model.layers.1.mlp.experts.2.down_proj.weight"])
    assert torch.equal(state["layers.0.ffn.w13"][:56], reference["model.layers.0.mlp.gate_proj.weight"])
    with torch.no_grad():
        assert (model(ids) - ref_logits).abs().max() <= 1e-4


def test_a_missing_scale_or_a_bad_block_size_is_named(fp8_checkpoint, tmp_path):
    path, *_ = fp8_checkpoint
    state = safetensors_torch.load_file(str(path / "model.safetensors"))
    del state["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="incomplete quantized tensors.*o_proj.weight"):
        load_hf(tmp_path)
    config["quantization_config"]["weight_block_size"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_block_size=None"):
        load_hf(tmp_path)
