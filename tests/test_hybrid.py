"""Hybrid models (Gated DeltaNet "linear" layers + gated attention, the `hybrid-tiny` preset) on every
forward plan: cached decoding and chunked prefill equal the full forward, left padding equals the
unpadded run, the static step leaves rows that are not decoding alone, ragged segments continue their
own rows, speculative decoding gives the plain greedy output, the engine equals `generate`, training
lowers the loss; parameter counts of the published presets equal transformers' meta-device models."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.engine import Engine, SamplingParams
from moekit.generate import generate
from moekit.plan import ForwardPlan, Segment
from moekit.speculative import speculative_generate


@functools.lru_cache(maxsize=None)
def model_for(dtype=torch.float32, fused=False, scaled=True) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("hybrid-tiny", linear_fused_proj=fused)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.2)  # not the identity: the norms must be applied right
            if scaled and name == "lm_head.weight":
                p.mul_(50.0)  # well-separated logits: greedy paths agree whatever the GEMM bits
    return model.eval()


def tokens(B, T, seed=0):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fused", [False, True])
def test_cached_prefill_chunks_and_decode_equal_the_full_forward(fused):
    model = model_for(torch.float64, fused)
    ids = tokens(2, 80)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 80)
        parts = [model(ids[:, :70], cache=cache, start=0), model(ids[:, 70:75], cache=cache, start=70)]
        parts += [model(ids[:, t:t + 1], cache=cache, start=t) for t in range(75, 80)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-10)


def test_a_new_prefill_resets_the_state():
    model = model_for(torch.float64)
    ids = tokens(1, 12)
    with torch.no_grad():
        cache = model.new_cache(1, 12)
        model(tokens(1, 12, seed=5), cache=cache, start=0)
        again = model(ids, cache=cache, start=0)
    torch.testing.assert_close(again, model(ids), rtol=0, atol=1e-10)


def test_left_padding_equals_the_unpadded_run():
    model = model_for(torch.float64)
    ids = tokens(2, 20)
    lens = [20, 9]
    padded = ids.clone()
    padded[1, :11] = 0
    padded[1, 11:] = ids[1, :9]
    key_mask = torch.arange(24)[None, :] >= torch.tensor([0, 11])[:, None]
    positions = (key_mask[:, :20].long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_cache(2, 24)
        out = model(padded, positions_BT=positions, cache=cache, start=0, key_mask_BS=key_mask)
        nxt = torch.tensor([[3], [4]])
        step = model(nxt, positions_BT=torch.tensor([[20], [9]]), cache=cache, start=20, key_mask_BS=key_mask)
        for b, n in enumerate(lens):
            alone = model(torch.cat([ids[b:b + 1, :n], nxt[b:b + 1]], dim=1))
            torch.testing.assert_close(out[b, 20 - n:], alone[0, :n], rtol=0, atol=1e-10)
            torch.testing.assert_close(step[b, 0], alone[0, n], rtol=0, atol=1e-10)


def test_static_step_writes_only_the_active_rows():
    model = model_for(torch.float64)
    ids = tokens(3, 6)
    with torch.no_grad():
        cache = model.new_cache(3, 16)
        model(ids, cache=cache, start=0)
        linear = [layer for layer in cache.layers if hasattr(layer, "snapshot")]
        before = [layer.snapshot() for layer in linear]
        nxt = torch.tensor([[7], [8], [9]])
        slots = torch.tensor([6, 15, 6])  # row 1 is not decoding: a throw-away slot
        logits = model.decode_step(nxt, slots[:, None], slots, torch.ones(3, 16, dtype=torch.bool), cache,
                                   static=True, active_rows=torch.tensor([0, 2]))
        for layer, (conv, state) in zip(linear, before):
            assert torch.equal(layer.conv[1], conv[1]) and torch.equal(layer.state[1], state[1])
            assert not torch.equal(layer.state[0], state[0])
        expected = model(torch.cat([ids, nxt], dim=1))[:, -1]
    torch.testing.assert_close(logits, expected[[0, 2]], rtol=0, atol=1e-10)  # the active rows' logits


def test_ragged_segments_continue_their_own_rows():
    model = model_for(torch.float64)
    a, b = tokens(1, 30, seed=1)[0].tolist(), tokens(1, 9, seed=2)[0].tolist()
    with torch.no_grad():
        cache = model.new_cache(2, 40)
        row0, row1 = cache.rows(0, 1), cache.rows(1, 2)
        segments = [Segment(a[:20], 0, row0, True), Segment(b, 0, row1, True)]
        plan = ForwardPlan.ragged(segments, rows=32, numerics=ForwardPlan.dense(tokens(1, 1)).numerics)
        ids = torch.tensor([a[:20] + b + [0] * 3])
        first = model.forward_plan(ids, plan)
        plan2 = ForwardPlan.ragged([Segment(a[20:], 20, row0, True)], rows=10,
                                   numerics=plan.numerics)
        second = model.forward_plan(torch.tensor([a[20:]]), plan2)
        expected_a, expected_b = model(torch.tensor([a]))[0], model(torch.tensor([b]))[0]
    torch.testing.assert_close(first[0], expected_a[19].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(first[1], expected_b[-1].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(second[0], expected_a[-1].float(), rtol=0, atol=1e-6)


def test_speculative_decoding_gives_the_plain_greedy_output():
    target = model_for()
    draft = Transformer(ModelConfig.preset("hybrid-tiny", n_layers=2, layer_types=("linear", "full"))).eval()
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 1, 2, 3]  # repeats: the n-gram proposer gets some right
    expected = generate(target, [prompt], max_new_tokens=24)[0]
    assert speculative_generate(target, prompt, 24, ngram=2, gamma=4)[0] == expected
    out, stats = speculative_generate(target, prompt, 24, draft=draft, gamma=3)  # a hybrid draft as well
    assert out == expected and stats.proposed > stats.accepted  # rejections, so both rolled back


def engine_case(lengths, batch_invariant):
    model = model_for()
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in lengths]
    expected = [generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    engine = Engine(model, batch_invariant=batch_invariant, prefill_chunk=16, max_step_tokens=48)
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=8))], expected


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_engine_greedy_equals_generate(batch_invariant):
    """Prompts prefilled in one step, then decoded together (and empty pool rows padding the bucket)."""
    out, expected = engine_case((1, 7, 2, 9, 13), batch_invariant)
    assert out == expected


def test_engine_greedy_equals_generate_with_chunked_prefill_beside_decoding():
    out, expected = engine_case((1, 40, 7, 17), False)
    assert out == expected


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("hybrid-tiny")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = tokens(4, 33)
    losses = []
    for _ in range(6):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        (loss + model.moe_aux().loss).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert all(p.grad is not None for n, p in model.named_parameters() if ".attn." in n)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layer_types=("linear", "full"), n_layers=2), "linear_num_key_heads=0"),
    (dict(layer_types=("linear", "full"), n_layers=2, linear_num_key_heads=3, linear_num_value_heads=4,
          linear_key_head_dim=8, linear_value_head_dim=8), "multiple of linear_num_key_heads=3"),
    (dict(linear_num_key_heads=2), "only apply to 'linear' layer_types"),
    (dict(linear_fused_proj=True), "linear_fused_proj=True only apply"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


transformers = pytest.importorskip("transformers")

# preset -> (transformers model_type, config.json values)
PUBLISHED = {
    "qwen3-next-80b-a3b": ("qwen3_next", dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        num_experts=512, num_experts_per_tok=10, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, full_attention_interval=4)),
    "qwen3.5-397b-a17b": ("qwen3_5_moe_text", dict(
        vocab_size=248320, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32, num_key_value_heads=2,
        head_dim=256, moe_intermediate_size=1024, shared_expert_intermediate_size=1024, num_experts=512,
        num_experts_per_tok=10, linear_num_key_heads=16, linear_num_value_heads=64, linear_key_head_dim=128,
        linear_value_head_dim=128)),
    "qwen3.6-35b-a3b": ("qwen3_5_moe_text", dict(
        vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256,
        num_experts_per_tok=8, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128)),
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_published_parameter_counts_equal_transformers(preset):
    from moekit.hf import config_from_hf

    model_type, values = PUBLISHED[preset]
    hf_cfg = transformers.AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        ours = Transformer(ModelConfig.preset(preset))
    assert ours.num_params() == sum(p.numel() for p in hf_model.parameters())
    parsed = config_from_hf({**hf_cfg.to_dict(), "model_type": model_type})
    for field in ("layer_types", "rotary_dim", "linear_num_value_heads", "n_kv_heads", "head_dim"):
        assert getattr(parsed, field) == getattr(ours.cfg, field), field
