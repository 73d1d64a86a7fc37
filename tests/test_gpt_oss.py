"""gpt_oss (hf/gpt_oss.py) against transformers' GptOssForCausalLM: a random tiny model (odd sizes, GQA,
sliding and full layers, sinks, biases, YaRN with truncate=False) saved by transformers: logits, save_hf
round trips, greedy generation of a batch of prompts of different lengths, the engine."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")
if not hasattr(transformers, "GptOssForCausalLM"):
    pytest.skip("this transformers has no GptOssForCausalLM", allow_module_level=True)

from moekit import cache as cache_module  # noqa: E402
from moekit.engine import Engine, SamplingParams  # noqa: E402
from moekit.generate import generate  # noqa: E402
from moekit.hf import config_from_hf, load_hf, save_hf  # noqa: E402

ATOL = 1e-4
VOCAB = 61
HF_KW = dict(attn_implementation="eager", experts_implementation="eager")
CONFIG = dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
              head_dim=12, intermediate_size=14, num_local_experts=5, num_experts_per_tok=2,
              max_position_embeddings=128, sliding_window=4, layer_types=["sliding_attention", "full_attention",
                                                                           "sliding_attention"],
              rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False, "original_max_position_embeddings": 32, "rope_theta": 1000.0})
# openai/gpt-oss-20b's config.json (the fields moekit reads)
GPT_OSS_20B = {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
               "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
               "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128, "attention_bias": True,
               "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
               "rms_norm_eps": 1e-05, "rope_theta": 150000, "swiglu_limit": 7.0, "tie_word_embeddings": False,
               "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "rope_type": "yarn",
                                "original_max_position_embeddings": 4096, "truncate": False},
               "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                   "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}


@torch.no_grad()
def randomize(model, seed=0):
    """Weights of scale 1/sqrt(fan-in), decisive router logits, spread output logits (no near-ties)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith("router.weight"):
            p.copy_(noise)
        elif p.dim() >= 2:
            p.copy_(noise * p.shape[-2 if ".experts." in name else -1] ** -0.5)  # HF experts: (E, in, out)
        else:
            p.copy_(0.3 * noise)
    model.lm_head.weight.mul_(8.0)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(checkpoint dir, token ids, transformers' logits, transformers' model)."""
    cfg = transformers.AutoConfig.for_model("gpt_oss", **CONFIG)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, **HF_KW).eval()
    randomize(model)
    path = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(path)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return path, ids, model(ids).logits, model


def _diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_load_matches_transformers(hf_model):
    path, ids, ref, _ = hf_model
    model = load_hf(path)
    cfg = model.cfg
    assert (cfg.layer_types, cfg.sliding_window, cfg.attention_sinks, cfg.attention_out_bias) == (
        ("sliding", "full", "sliding"), 4, True, True)
    assert (cfg.moe.router, cfg.moe.router_bias, cfg.moe.expert_bias, cfg.moe.activation) == (
        "topk_softmax", True, True, "swiglu_oai")
    with torch.no_grad():
        assert _diff(model(ids), ref) <= ATOL
        model.layers[0].attn.window = None  # the same weights without the window: another model
        assert _diff(model(ids), ref) > 1e-2


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_save_round_trip(hf_model, tmp_path, dtype):
    path, ids, ref, _ = hf_model
    out = save_hf(load_hf(path), tmp_path / "out", dtype=dtype)  # gpt_oss inferred
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["layer_types"] == CONFIG["layer_types"]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32,
                                                                 **HF_KW)
    assert not {k: v for k, v in info.items() if v}, info
    tol = ATOL if dtype is None else 0.5
    with torch.no_grad():
        assert _diff(hf.eval()(ids).logits, ref) <= tol
        assert _diff(load_hf(out, dtype="float32")(ids), ref) <= tol


def test_greedy_generate_and_engine_equal_transformers(hf_model, monkeypatch):
    path, _, _, hf = hf_model
    monkeypatch.setattr(cache_module, "WINDOW_SPARE", 2)  # a ring of 6 slots: wrapped while generating
    model = load_hf(path)
    prompts = [[5, 17, 30, 42, 7, 11, 3, 9, 14], [8, 2]]
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=14, min_new_tokens=14, do_sample=False,
                        pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    assert generate(model, prompts, max_new_tokens=14) == refs
    engine = Engine(model, prefill_chunk=4, max_step_tokens=8)
    out = engine.generate(prompts, SamplingParams(max_tokens=14))
    assert [o.token_ids for o in out] == refs


def test_published_config_and_its_defaults():
    cfg = config_from_hf(GPT_OSS_20B)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.sliding_window, cfg.layer_types[:2]) == (64, 8, 128, ("sliding", "full"))
    assert cfg.rope_scaling == {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
    assert (cfg.max_seq_len, cfg.rope_theta, cfg.moe.num_experts, cfg.moe.swiglu_limit) == (131072, 150000.0, 32, 7.0)
    # transformers' defaults when config.json leaves them out: every other layer sliding, its YaRN
    bare = {k: v for k, v in GPT_OSS_20B.items() if k not in ("layer_types", "rope_scaling", "head_dim", "rope_theta")}
    again = config_from_hf(bare)
    assert (again.layer_types, again.rope_scaling, again.head_dim) == (cfg.layer_types, cfg.rope_scaling, 64)
    with pytest.raises(ValueError, match="layer_types \\['chunked_attention'\\]"):
        config_from_hf({**GPT_OSS_20B, "layer_types": ["chunked_attention"] * 24})
