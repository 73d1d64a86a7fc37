"""The frontier presets (gpt-oss, GLM-4.5, MiniMax-M2, Kimi K2): the analyzer's parameter count equals
transformers' count of the same configuration built on the meta device (config.json from save_hf's
writer), and moekit's own meta model; the sliding layers' KV bytes count only the window."""

from __future__ import annotations

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.analyze import analyze
from moekit.analyze.arch import from_hf_config, from_model_config
from moekit.analyze.estimate import kv_bytes_per_token
from moekit.hf import config_to_hf

transformers = pytest.importorskip("transformers")

# preset -> (HF model_type, the published total in billions as the model cards round it)
PRESETS = {"gpt-oss-20b": ("gpt_oss", 20.9), "gpt-oss-120b": ("gpt_oss", 116.8), "glm-4.5": ("glm4_moe", None),
           "glm-4.5-air": ("glm4_moe", None), "minimax-m2": ("minimax_m2", None), "kimi-k2": ("deepseek_v3", None)}


def _meta_params(hf: dict) -> int:
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_params_equal_transformers_meta_model(name):
    model_type, published = PRESETS[name]
    if model_type == "minimax_m2" and not hasattr(transformers, "MiniMaxM2ForCausalLM"):
        pytest.skip("this transformers has no MiniMaxM2ForCausalLM")
    cfg = ModelConfig.preset(name)
    hf = config_to_hf(cfg, model_type, "bfloat16")
    total = _meta_params(hf)
    assert analyze(from_model_config(cfg))["params_total"] == total
    assert analyze(from_hf_config(hf))["params_total"] == total
    with torch.device("meta"):
        ours = Transformer(cfg)
    assert ours.num_params() == total
    moe, moe_layers = cfg.moe, sum(block.is_moe for block in ours.layers)
    experts = ours.moe_layers()[0].experts
    per_expert = sum(p[0].numel() for p in (experts.w13, experts.w2, experts.b13, experts.b2) if p is not None)
    inactive = (moe.num_experts - moe.top_k) * moe_layers * per_expert  # biases included
    assert analyze(from_model_config(cfg))["params_active"] == total - inactive
    if published is not None:
        assert round(total / 1e9, 1) == published


def test_published_sizes():
    """Kimi K2 ~1.03T, GLM-4.5 ~355B (the model card counts its next-token-prediction layer), Air ~106B,
    MiniMax-M2 ~230B: the meta-device counts, rounded."""
    sizes = {n: analyze(from_model_config(ModelConfig.preset(n)))["params_total"] / 1e9
             for n in ("kimi-k2", "glm-4.5", "glm-4.5-air", "minimax-m2")}
    assert round(sizes["kimi-k2"] / 1000, 2) == 1.03
    assert 350 < sizes["glm-4.5"] < 356 and 105 < sizes["glm-4.5-air"] < 107 and 228 < sizes["minimax-m2"] < 231


def test_sliding_layers_hold_only_the_window():
    cfg = ModelConfig.preset("gpt-oss-20b")
    arch = from_model_config(cfg)
    per_layer = 2 * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bf16
    assert kv_bytes_per_token(arch, 2) == 24 * per_layer  # no context: every layer per token
    at_8k = kv_bytes_per_token(arch, 2, 8192) * 8192
    assert at_8k == 12 * per_layer * 8192 + 12 * per_layer * 128  # full layers at 8192 tokens, sliding at 128
    assert kv_bytes_per_token(arch, 2, 100) == 24 * per_layer  # shorter than the window: all of it
