"""gpt-oss MXFP4 checkpoints (hf/packed.py): a tiny gpt_oss checkpoint written here in the hub's layout
(`*_blocks` / `*_scales` from moekit.lowp.mx's codec, quantization_config mxfp4) loads packed and
dequantized with the logits of transformers' model holding transformers' own dequantization; save_hf
writes it back as float tensors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
if not hasattr(transformers, "GptOssForCausalLM"):
    pytest.skip("this transformers has no GptOssForCausalLM", allow_module_level=True)
from transformers.integrations.mxfp4 import convert_moe_packed_tensors  # noqa: E402

from moekit.hf import load_hf, save_hf  # noqa: E402
from moekit.lowp.mx import mx_quantize, pack_e2m1  # noqa: E402
from moekit.quantize.modules import QuantizedWeight  # noqa: E402

VOCAB = 47
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=32, num_local_experts=3, num_experts_per_tok=2,
              max_position_embeddings=64, sliding_window=3)
HF_KW = dict(attn_implementation="eager", experts_implementation="eager")


def pack(w_ENK):
    """gpt-oss's blocks (E, N, K/32, 16) and scales (E, N, K/32) of a weight (E, N, K)."""
    codes, scales = mx_quantize(w_ENK)
    E, N, K = w_ENK.shape
    return pack_e2m1(codes).reshape(E, N, K // 32, 16).contiguous(), scales.contiguous()


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """(dir, token ids, transformers' logits with its own dequantization of the packed experts)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_gpt_oss import randomize

    cfg = transformers.AutoConfig.for_model("gpt_oss", **CONFIG)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, **HF_KW).eval()
    randomize(model, seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for i in range(CONFIG["num_hidden_layers"]):
            for name in ("gate_up_proj", "down_proj"):
                key = f"model.layers.{i}.mlp.experts.{name}"
                blocks, scales = pack(state.pop(key).transpose(1, 2))  # HF (E, in, out) -> rows out, packed in
                state[key + "_blocks"], state[key + "_scales"] = blocks, scales
                getattr(model.model.layers[i].mlp.experts, name).copy_(
                    convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    safetensors_torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {**cfg.to_dict(), "quantization_config": {"quant_method": "mxfp4"}, "dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return path, ids, model(ids).logits


def test_packed_experts_load_bit_for_bit(mxfp4_checkpoint):
    path, ids, ref = mxfp4_checkpoint
    packed = load_hf(path)
    experts = packed.layers[0].ffn.experts
    assert isinstance(experts.w13, QuantizedWeight) and experts.w13.method == "mxfp4"
    assert experts.w13.bits_per_weight() == 4.25 and packed.quantization["experts_only"]
    dense = load_hf(path, dequantize=True)
    assert isinstance(dense.layers[0].ffn.experts.w13, torch.nn.Parameter)
    for a, b in zip(packed.layers, dense.layers):  # the packed bytes decode to the dequantized weights exactly
        assert torch.equal(a.ffn.experts.w13.dense(), b.ffn.experts.w13)
        assert torch.equal(a.ffn.experts.w2.dense(), b.ffn.experts.w2)
    with torch.no_grad():
        assert (packed(ids) - ref).abs().max() <= 1e-4
        assert (dense(ids) - ref).abs().max() <= 1e-4


def test_save_hf_writes_the_dequantized_weights(mxfp4_checkpoint, tmp_path):
    path, ids, ref = mxfp4_checkpoint
    out = save_hf(load_hf(path), tmp_path / "out")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, **HF_KW).eval()
    with torch.no_grad():
        assert (hf(ids).logits - ref).abs().max() <= 1e-4


def test_incomplete_packed_tensors_are_named(mxfp4_checkpoint, tmp_path):
    path, _, _ = mxfp4_checkpoint
    state = safetensors_torch.load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.experts.down_proj_scales"]
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="incomplete quantized tensors.*layers.1.mlp.experts.down_proj.*_blocks"):
        load_hf(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="quant_method='gptq' is not supported"):
        load_hf(tmp_path)
