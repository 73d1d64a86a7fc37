"""Multi-head latent attention (attention/mla.py) and deepseek_v3 / kimi_k2 checkpoints against
transformers' DeepseekV3ForCausalLM: logits, save round trip, greedy generation, the latent cache
(bytes and incremental decoding), the engine and training."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moekit import ModelConfig, Transformer  # noqa: E402
from moekit.analyze.estimate import kv_bytes_per_token  # noqa: E402
from moekit.engine import Engine, SamplingParams  # noqa: E402
from moekit.engine.kv import kv_bytes_per_token as engine_kv_bytes  # noqa: E402
from moekit.generate import generate  # noqa: E402
from moekit.hf import get_spec, load_hf, save_hf  # noqa: E402

ATOL = 1e-4
VOCAB = 73
HF_KW = dict(attn_implementation="eager", experts_implementation="eager")
# odd sizes, 1 dense + 2 MoE layers, 2 expert groups
BASE = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=56, moe_intermediate_size=18, num_hidden_layers=3,
            num_attention_heads=3, num_key_value_heads=3, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=1.7, kv_lora_rank=20,
            qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=11, first_k_dense_replace=1,
            max_position_embeddings=64)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.8}
CASES = {
    "q_lora": dict(q_lora_rank=24),
    "no_q_lora": dict(q_lora_rank=None),
    "rotate_half_bias": dict(q_lora_rank=24, rope_interleave=False, attention_bias=True),
    "yarn": dict(q_lora_rank=None, rope_parameters=YARN),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (norms near 1, decisive routers, a non-zero router bias)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith(("norm.weight", "layernorm.weight")):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith(("mlp.gate.weight", "router.weight")):
            p.copy_(noise)
        elif p.dim() >= 2:
            p.copy_(noise * p.shape[-1] ** -0.5)
        else:
            p.copy_(0.1 * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn(b.shape, generator=g))


def build_hf(case: str):
    cfg = transformers.DeepseekV3Config(**{**BASE, **CASES[case]})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM._from_config(cfg, **HF_KW).eval()
    randomize(model)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for case in CASES:
        path = tmp_path_factory.mktemp(case)
        build_hf(case).save_pretrained(path)
        out[case] = path
    return out


def tokens(seed=1, shape=(2, 13)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(path, tokens_BT):
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, **HF_KW).eval()
    with torch.no_grad():
        return model(tokens_BT).logits


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(hf_dirs, case):
    model = load_hf(hf_dirs[case])
    assert model.cfg.attention == "mla"
    t = tokens()
    with torch.no_grad():
        assert torch.allclose(model(t), hf_logits(hf_dirs[case], t), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_save_hf_round_trip_into_transformers(hf_dirs, case, tmp_path):
    model = load_hf(hf_dirs[case])
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    t = tokens(2)
    with torch.no_grad():
        assert torch.allclose(hf_logits(tmp_path, t), model(t), atol=ATOL, rtol=0)
    assert load_hf(tmp_path).cfg == model.cfg


def test_kimi_k2_loads_with_deepseek_layout(hf_dirs, tmp_path):
    src = hf_dirs["q_lora"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    t = tokens(3)
    with torch.no_grad():
        assert torch.allclose(load_hf(tmp_path)(t), hf_logits(src, t), atol=ATOL, rtol=0)


def test_greedy_generate_equals_transformers(hf_dirs):
    hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dirs["q_lora"], **HF_KW).eval()
    with torch.no_grad():
        hf_model.lm_head.weight.mul_(20.0)  # spread the logits: no near-ties
    model = load_hf(hf_dirs["q_lora"])
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    prompt = [5, 17, 30, 42, 7]
    ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                            pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert generate(model, [prompt], max_new_tokens=10) == [ref]


def test_cache_holds_only_the_latent_and_the_rotary_key(hf_dirs):
    model = load_hf(hf_dirs["q_lora"])
    hf = json.loads((hf_dirs["q_lora"] / "config.json").read_text())
    by_hand = BASE["num_hidden_layers"] * (BASE["kv_lora_rank"] + BASE["qk_rope_head_dim"]) * 2  # bf16
    assert engine_kv_bytes(model, torch.bfloat16) == by_hand
    assert model.new_cache(1, 1, torch.bfloat16, "meta").nbytes_per_slot == by_hand
    arch = get_spec("deepseek_v3").to_arch(hf, "tiny")
    assert kv_bytes_per_token(arch, 2) == by_hand


def mla_tiny(scaled: bool = True) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("mla-tiny"))
    if scaled:
        with torch.no_grad():
            model.lm_head.weight.mul_(50.0)  # no near-ties in greedy comparisons
    return model.eval()


@pytest.mark.parametrize("absorb", [False, True])
def test_incremental_decoding_equals_full_recomputation(absorb):
    model = mla_tiny(scaled=False)
    t = tokens(4, (2, 12)) * 7
    with torch.no_grad():
        for block in model.layers:
            block.attn.absorb = False
        full = model(t)
        for block in model.layers:
            block.attn.absorb = absorb
        cache = model.new_cache(2, 16)
        steps = [model(t[:, :5], cache=cache, start=0)]
        steps += [model(t[:, i:i + 1], cache=cache, start=i) for i in range(5, 12)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_engine_equals_generate():
    model = mla_tiny()
    prompts = [[5, 17, 300, 42, 7, 99, 1], [8, 3], list(range(1, 40)), [400]]
    engine = Engine(model, prefill_chunk=16, max_step_tokens=48)
    out = engine.generate(prompts, SamplingParams(max_tokens=8))
    assert [o.token_ids for o in out] == [generate(model, [p], max_new_tokens=8)[0] for p in prompts]


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("mla-tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t = tokens(5, (4, 33)) * 7
    losses = []
    for _ in range(8):
        logits = model(t[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), t[:, 1:].flatten())
        opt.zero_grad()
        (loss + model.moe_aux().loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("overrides, message", [
    (dict(attention="mla", kv_lora_rank=0), "kv_lora_rank must be a positive integer"),
    (dict(attention="mla", q_lora_rank=0), "q_lora_rank must be None or a positive integer"),
    (dict(attention="mla", head_dim=16), "head_dim=16 must equal qk_rope_head_dim=8"),
    (dict(attention="mla", n_kv_heads=2), "n_kv_heads=2 must equal n_heads=4"),
    (dict(attention="gqa", head_dim=None), "only apply to attention='mla'"),
])
def test_mla_config_errors_name_the_values(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ModelConfig.preset("mla-tiny", **overrides)
