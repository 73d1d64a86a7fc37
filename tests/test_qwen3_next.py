"""Qwen3-Next and Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention) against transformers itself:
random tiny transformers models saved with `save_pretrained`; `load_hf` gives the same float32 logits and
greedy generation for left-padded batches, `save_hf` writes checkpoints transformers loads with the same
logits, and a multimodal qwen3_5_moe checkpoint loads its text model."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moekit.generate import generate  # noqa: E402
from moekit.hf import config_from_hf, load_hf, save_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
ATOL = 1e-4
VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=40, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=10,
              shared_expert_intermediate_size=14, max_position_embeddings=256, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6)
CASES = {  # model_type -> its own config entries
    "qwen3_next": dict(intermediate_size=28, mlp_only_layers=[2], norm_topk_prob=True, full_attention_interval=2),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"]),
}


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    """Random weights everywhere (zero-centred norms around 0, the gated norm around 1, decisive routing,
    decay rates A in [0.5, 4])."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("linear_attn.norm.weight"):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith("norm.weight"):
            p.copy_(0.2 * noise)
        elif name.endswith("mlp.gate.weight"):
            p.copy_(noise)
        elif name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(0.5, 4.0, generator=g).log())
        elif p.dim() >= 2:
            p.copy_(noise * p.shape[-1] ** -0.5)
        else:
            p.copy_(0.1 * noise)


def hf_kwargs():
    return dict(attn_implementation="eager", experts_implementation="eager")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """model_type -> (checkpoint dir, ids (2, 75), transformers' logits, the transformers model)."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **CASES[model_type]})
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, **hf_kwargs()).eval()
            randomize(model)
            path = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(path)
            ids = torch.randint(0, VOCAB, (2, 75), generator=torch.Generator().manual_seed(1))  # > one chunk
            with torch.no_grad():
                cache[model_type] = (path, ids, model(ids).logits, model)
        return cache[model_type]

    return get


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("model_type", list(CASES))
def test_load_matches_transformers(case, model_type):
    path, ids, ref, _ = case(model_type)
    model = load_hf(path)
    with torch.no_grad():
        assert max_diff(model(ids), ref) < ATOL


def test_config_fields_both_ways(case):
    path, _, _, _ = case("qwen3_next")
    cfg = load_hf(path).cfg
    assert cfg.layer_types == ("linear", "full", "linear", "full")  # full_attention_interval=2
    assert (cfg.rotary_dim, cfg.attn_output_gate, cfg.zero_centred_norm, cfg.linear_fused_proj) == (4, True, True, True)
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim, cfg.linear_conv_kernel) == (2, 4, 8, 6, 4)
    assert cfg.dense_layers == (2,) and cfg.moe.shared_gate and cfg.moe.d_shared == 14
    path35, _, _, _ = case("qwen3_5_moe_text")
    cfg35 = load_hf(path35).cfg
    assert cfg35.layer_types == ("linear", "full", "linear", "linear") and not cfg35.linear_fused_proj
    assert cfg35.moe.norm_topk_prob and not [i for i in range(4) if cfg35.is_dense_layer(i)]
    hf = json.loads((path / "config.json").read_text())
    hf.pop("layer_types")
    hf["full_attention_interval"] = 4  # without layer_types: every 4th layer is full attention
    assert config_from_hf(hf).layer_types == ("linear", "linear", "linear", "full")


@pytest.mark.parametrize("model_type, layout", [("qwen3_next", "per_expert"), ("qwen3_5_moe_text", "fused")])
def test_save_round_trip(case, tmp_path, model_type, layout):
    path, ids, ref, _ = case(model_type)
    out = save_hf(load_hf(path), tmp_path / "out", layout=layout)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, **hf_kwargs())
    assert not {k: v for k, v in info.items() if v}
    with torch.no_grad():
        assert max_diff(model.eval()(ids).logits, ref) < ATOL
        assert max_diff(load_hf(out)(ids), ref) < ATOL


@pytest.mark.parametrize("model_type", list(CASES))
def test_greedy_generate_equals_transformers_for_padded_batches(case, model_type):
    path, _, _, hf_model = case(model_type)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (5, 70, 12)]
    ours = generate(load_hf(path), prompts, max_new_tokens=8)
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0)
    assert ours == theirs[:, P:].tolist()


def test_multimodal_qwen3_5_moe_checkpoint_loads_its_text_model(case, tmp_path):
    from safetensors.torch import load_file, save_file

    path, ids, ref, _ = case("qwen3_5_moe_text")
    text = json.loads((path / "config.json").read_text())
    state = load_file(str(path / "model.safetensors"))
    state = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
             for k, v in state.items()}
    state["model.visual.patch_embed.proj.weight"] = torch.zeros(2, 3)  # the vision tower: skipped
    state["mtp.fc.weight"] = torch.zeros(2, 2)  # multi-token prediction: skipped
    mm = tmp_path / "mm"
    mm.mkdir()
    save_file(state, str(mm / "model.safetensors"))
    config = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
              "text_config": {**text, "model_type": "qwen3_5_moe_text"}, "vision_config": {},
              "tie_word_embeddings": False}
    (mm / "config.json").write_text(json.dumps(config))
    model = load_hf(mm)
    assert "vision tower" in model.cfg.notes
    with torch.no_grad():
        assert max_diff(model(ids), ref) < ATOL
    with pytest.raises(ValueError, match="qwen3_5_moe_text"):
        save_hf(model, tmp_path / "back", model_type="qwen3_5_moe")
    assert json.loads((save_hf(model, tmp_path / "text") / "config.json").read_text())["model_type"] == \
        "qwen3_5_moe_text"
