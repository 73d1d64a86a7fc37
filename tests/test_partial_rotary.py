"""Partial rotary embeddings (RoPE on the first rotary_dim dims of each head, the rest passed
through): GLM-4.5 (glm4_moe with partial_rotary_factor 0.5) and MiniMax-M2 (minimax_m2, rotary_dim),
against transformers' own models: logits, save_hf round trips, greedy generation, the engine and
incremental decoding."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors.torch")

from moekit import ModelConfig, MoEConfig, Transformer  # noqa: E402
from moekit.engine import Engine, SamplingParams  # noqa: E402
from moekit.generate import generate  # noqa: E402
from moekit.hf import config_from_hf, load_hf, save_hf  # noqa: E402
from moekit.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
ATOL = 1e-4
VOCAB = 61
HF_KW = dict(attn_implementation="eager", experts_implementation="eager")
COMMON = dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=64, head_dim=12, rope_theta=1000.0)
CASES = {  # name -> (model_type, config overrides, rotary dim)
    "glm4_moe-qknorm": ("glm4_moe", dict(intermediate_size=28, n_routed_experts=6, moe_intermediate_size=10,
                                         n_shared_experts=1, first_k_dense_replace=1, use_qk_norm=True,
                                         attention_bias=True, partial_rotary_factor=0.5), 6),
    "glm4_moe-default": ("glm4_moe", dict(intermediate_size=28, n_routed_experts=4, moe_intermediate_size=10,
                                          n_shared_experts=0, first_k_dense_replace=0, use_qk_norm=False,
                                          attention_bias=True), 6),  # transformers' default factor: 0.5
    "glm4_moe-yarn": ("glm4_moe", dict(intermediate_size=28, n_routed_experts=4, moe_intermediate_size=10,
                                       n_shared_experts=1, first_k_dense_replace=1, attention_bias=True,
                                       rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000.0,
                                                        "original_max_position_embeddings": 16,
                                                        "attention_factor": 1.0, "partial_rotary_factor": 0.5}), 6),
    "minimax_m2": ("minimax_m2", dict(intermediate_size=14, num_local_experts=5, rotary_dim=4), 4),
}
HAS_MINIMAX = hasattr(transformers, "MiniMaxM2ForCausalLM")


@torch.no_grad()
def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith(("gate.weight", "router.weight")):
            p.copy_(noise)  # decisive routing: no near-ties between transformers and moekit
        elif p.dim() >= 2 and p.numel():
            p.copy_(noise * p.shape[-1] ** -0.5)
        else:
            p.copy_(0.1 * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
    model.lm_head.weight.mul_(8.0)  # spread the logits: no near-ties in greedy decoding


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    """name -> (checkpoint dir, token ids, transformers' logits, transformers' model)."""
    cache = {}

    def get(name):
        if name.startswith("minimax") and not HAS_MINIMAX:
            pytest.skip("this transformers has no MiniMaxM2ForCausalLM")
        if name not in cache:
            model_type, overrides, _ = CASES[name]
            cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **overrides})
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, **HF_KW).eval()
            _randomize(model)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                cache[name] = (path, ids, model(ids).logits, model)
        return cache[name]

    return get


def _diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_apply_rope_rotates_only_the_first_dims():
    """moekit's cos/sin of rotary dim R and apply_rope equal transformers' partial rotary by hand."""
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

    R, Dh = 6, 14
    x_BHTDh = torch.randn(2, 3, 5, Dh)
    positions_BT = torch.arange(5).repeat(2, 1) + 3
    cos, sin = rope_cos_sin(rope_inv_freq(R, 1000.0), positions_BT, torch.float32)
    assert cos.shape == (2, 5, R)
    ours = apply_rope(x_BHTDh, cos, sin)
    theirs, _ = apply_rotary_pos_emb(x_BHTDh, x_BHTDh, cos, sin)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(ours[..., R:], x_BHTDh[..., R:])


@pytest.mark.parametrize("name", list(CASES))
def test_load_matches_transformers(hf_case, name):
    path, ids, ref, _ = hf_case(name)
    model = load_hf(path)
    assert (model.cfg.rotary_dim, model.cfg.rope_dim) == (CASES[name][2], CASES[name][2])
    with torch.no_grad():
        assert _diff(model(ids), ref) <= ATOL
        whole = Transformer(model.cfg.replace(rotary_dim=None)).eval()
        whole.load_state_dict(model.state_dict())
        assert _diff(whole(ids), ref) > 1e-2  # rotating whole heads is not the same model


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", list(CASES))
def test_save_round_trip(hf_case, tmp_path, name, layout):
    path, ids, ref, _ = hf_case(name)
    out = save_hf(load_hf(path), tmp_path / "out", layout=layout)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == CASES[name][0]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **HF_KW)
    assert not {k: v for k, v in info.items() if v}, info
    with torch.no_grad():
        assert _diff(hf.eval()(ids).logits, ref) <= ATOL
        assert _diff(load_hf(out)(ids), ref) <= ATOL


def test_save_infers_the_architecture(tmp_path, hf_case):
    for name in ("glm4_moe-qknorm", "minimax_m2"):
        out = save_hf(load_hf(hf_case(name)[0]), tmp_path / name)  # no model_type named
        assert json.loads((out / "config.json").read_text())["model_type"] == CASES[name][0]


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generate_equals_transformers(hf_case, name):
    path, _, _, hf = hf_case(name)
    model = load_hf(path)
    prompts = [[5, 17, 30, 42, 7, 11, 3], [8, 2]]
    refs = [hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                        pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    assert generate(model, prompts, max_new_tokens=12) == refs
    engine = Engine(model, prefill_chunk=4, max_step_tokens=8)
    out = engine.generate(prompts, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in out] == refs


def test_incremental_decoding_equals_recomputation():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=40, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=14, rotary_dim=6,
                      qk_norm="full", moe=MoEConfig(d_model=40, d_expert=12, num_experts=4, top_k=2))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens_1T = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens_1T)
        cache = model.new_cache(1, 16)
        steps = [model(tokens_1T[:, :5], cache=cache, start=0)]
        steps += [model(tokens_1T[:, t:t + 1], cache=cache, start=t) for t in range(5, 13)]
    assert _diff(torch.cat(steps, dim=1), full) <= 1e-5


def test_glm45_air_config_loads_with_partial_rotary():
    """GLM-4.5-Air's published config.json (and the same without partial_rotary_factor, transformers'
    default 0.5): RoPE on 64 of 128 dims."""
    air = {"model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
           "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128, "n_shared_experts": 1,
           "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
           "norm_topk_prob": True, "first_k_dense_replace": 1, "attention_bias": True, "use_qk_norm": False,
           "partial_rotary_factor": 0.5, "rope_theta": 1000000, "rope_scaling": None,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "num_nextn_predict_layers": 1}
    assert config_from_hf(air).rotary_dim == 64
    assert config_from_hf({k: v for k, v in air.items() if k != "partial_rotary_factor"}).rotary_dim == 64
    assert config_from_hf({**air, "partial_rotary_factor": 1.0}).rotary_dim is None
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with pytest.raises(ValueError, match="YaRN attention_factor=1.13863 and partial rotary is not supported"):
        config_from_hf({**air, "rope_scaling": yarn})


def test_minimax_m2_config_fields():
    if not HAS_MINIMAX:
        pytest.skip("this transformers has no MiniMaxM2ForCausalLM")
    m2 = {"model_type": "minimax_m2", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 1536,
          "num_hidden_layers": 62, "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128,
          "num_local_experts": 256, "num_experts_per_tok": 8, "rotary_dim": 64, "rope_theta": 5000000,
          "use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True,
          "max_position_embeddings": 196608, "rms_norm_eps": 1e-06}
    cfg = config_from_hf(m2)
    assert (cfg.rotary_dim, cfg.qk_norm, cfg.moe.router, cfg.moe.norm_topk_prob, cfg.moe.num_groups) == (
        64, "full", "sigmoid_topk", True, 1)
    hf_config = transformers.AutoConfig.for_model(**m2)
    with torch.device("meta"):
        hf_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_config).parameters())
        assert Transformer(cfg).num_params() == hf_params
    with pytest.raises(ValueError, match="scoring_func='softmax' is not supported"):
        config_from_hf({**m2, "scoring_func": "softmax"})


@pytest.mark.parametrize("overrides, message", [
    (dict(rotary_dim=5), "rotary_dim=5 must be an even positive integer <= head_dim=16"),
    (dict(rotary_dim=18), "rotary_dim=18 must be an even"),
    (dict(rotary_dim=0), "rotary_dim=0 must be an even"),
])
def test_rotary_dim_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)
