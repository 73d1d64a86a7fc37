"""Attention sinks and sliding-window layers (gpt-oss) in attention/gqa.py, and the window cache
(cache.WindowKVCache, a ring of window + spare slots): a per-token reference, and every cached path
(chunked prefill longer than the ring, decode, the static step, left padding, speculative rollback)
against the full forward."""

from __future__ import annotations

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit import cache as cache_module
from moekit.cache import WINDOW_SPARE, KVLayerCache, WindowKVCache
from moekit.generate import generate
from moekit.plan import ForwardPlan
from moekit.speculative import speculative_generate

VOCAB, W = 53, 5


def _model(sinks=True, window=W, seed=0):
    types = ("sliding", "full", "sliding") if window else ()
    cfg = ModelConfig(vocab_size=VOCAB, d_model=36, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=10, d_ff=24,
                      layer_types=types, sliding_window=window, attention_sinks=sinks, attention_bias=True,
                      attention_out_bias=True, max_seq_len=160)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # weights that give varied greedy continuations
        for name, p in model.named_parameters():
            if name == "embed.weight":
                p.normal_()
            elif p.dim() == 2:
                p.normal_(std=p.shape[-1] ** -0.5)
            elif not name.endswith("norm.weight"):
                p.normal_(std=1.0 if name.endswith("sinks") else 0.1)
    return model


@pytest.fixture
def small_ring(monkeypatch):
    """A ring of window + 3 slots, so that short sequences wrap it several times."""
    monkeypatch.setattr(cache_module, "WINDOW_SPARE", 3)
    return W + 3


def _reference_attention(attn, x_BTD):
    """One query at a time: keys j with i - W < j <= i (all j <= i in a full layer), the sink as one more
    softmax term per head whose probability is dropped."""
    cfg = attn.cfg
    B, T, _ = x_BTD.shape
    cos, sin = Transformer(cfg).rope_inv_freq(), None
    positions = torch.arange(T)[None].expand(B, T)
    from moekit.rope import rope_cos_sin

    cos, sin = rope_cos_sin(cos, positions, x_BTD.dtype)
    q, k, v, _ = attn.project(x_BTD, cos, sin)  # (B, H, T, Dh), (B, G, T, Dh)
    R = cfg.n_heads // cfg.n_kv_heads
    out = torch.zeros(B, cfg.n_heads, T, cfg.head_dim)
    for h in range(cfg.n_heads):
        for i in range(T):
            lo = 0 if attn.window is None else max(0, i - attn.window + 1)
            scores = [float((q[b, h, i] @ k[b, h // R, j]) / cfg.head_dim ** 0.5) for b in range(B)
                      for j in range(lo, i + 1)]
            s_BJ = torch.tensor(scores).view(B, i + 1 - lo)
            sink = attn.sinks[h].item() if attn.sinks is not None else float("-inf")
            z_B = s_BJ.exp().sum(1) + torch.tensor(sink).exp()
            p_BJ = s_BJ.exp() / z_B[:, None]
            out[:, h, i] = torch.einsum("bj,bjd->bd", p_BJ, v[:, h // R, lo:i + 1])
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("sinks", [True, False])
def test_window_and_sinks_match_a_per_token_reference(sinks):
    model = _model(sinks=sinks)
    x_BTD = torch.randn(2, 12, 36)
    plan = ForwardPlan.dense(torch.zeros(2, 12, dtype=torch.long))
    from moekit.rope import rope_cos_sin

    rope = rope_cos_sin(model.inv_freq, plan.positions_BT, torch.float32)
    with torch.no_grad():
        for attn in (model.layers[0].attn, model.layers[1].attn):  # sliding, full
            assert attn.window == (W if attn is model.layers[0].attn else None)
            assert torch.allclose(attn(x_BTD, plan, rope), _reference_attention(attn, x_BTD), atol=1e-5)


def test_sliding_layers_keep_a_ring_of_the_window():
    model = _model()
    cache = model.new_cache(2, 150)
    assert [type(c) for c in cache.layers] == [WindowKVCache, KVLayerCache, WindowKVCache]
    assert cache.max_len == 150 and cache[0].k.shape[2] == W + WINDOW_SPARE and cache[1].k.shape[2] == 150
    assert model.new_cache(1, 8)[0].k.shape[2] == 8  # a short cache: no ring


def test_cached_chunks_and_decode_equal_the_full_forward(small_ring):
    """Chunks longer than the ring, single tokens and the ring wrapping several times."""
    model = _model()
    tokens_BT = torch.randint(0, VOCAB, (2, 4 * small_ring), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens_BT)
        cache = model.new_cache(2, tokens_BT.shape[1])
        assert cache[0].k.shape[2] == small_ring
        outs, pos = [], 0
        for n in (small_ring + 3, 1, 1, 3, 1, small_ring - 2, 1, 2 * small_ring):
            n = min(n, tokens_BT.shape[1] - pos)
            outs.append(model(tokens_BT[:, pos:pos + n], cache=cache, start=pos))
            pos += n
    assert pos == tokens_BT.shape[1]
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-4


def test_static_decode_step_equals_the_full_forward(small_ring):
    model = _model()
    T, S = 3 * small_ring, 4 * small_ring
    tokens_BT = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens_BT)
        cache = model.new_cache(2, S)
        model(tokens_BT[:, :4], cache=cache, start=0)
        valid_BS = torch.ones(2, S, dtype=torch.bool)
        for t in range(4, T):
            slots_B = torch.full((2,), t)
            logits_BV = model.decode_step(tokens_BT[:, t:t + 1], slots_B[:, None], slots_B, valid_BS, cache,
                                          static=False)
            assert (logits_BV - full[:, t]).abs().max() <= 1e-4


def test_left_padded_batch_generates_as_each_prompt_alone(small_ring):
    model = _model()
    prompts = [[3, 9, 4, 1, 7, 22, 5, 8, 13, 2, 40, 41], [6, 5], [11, 12] * 8]
    batched = generate(model, prompts, max_new_tokens=20)
    assert batched == [generate(model, [p], max_new_tokens=20)[0] for p in prompts]
    assert len(set(batched[0])) > 5  # a varied continuation
    assert generate(_model(window=None), prompts[:1], max_new_tokens=20) != batched[:1]  # the window matters


def test_speculative_rollback_in_the_ring_keeps_greedy_output(small_ring):
    model = _model()
    prompt = [3, 9, 4, 1, 7, 3, 9, 4, 1, 7, 3, 9, 4]
    want = generate(model, [prompt], max_new_tokens=30)[0]
    out, stats = speculative_generate(model, prompt, 30, gamma=4, ngram=1)  # rolls back up to spare + 1 = 4
    assert out == want and stats.proposed > stats.accepted  # drafts were rejected: the ring rolled back


def test_a_rollback_past_the_spare_slots_is_refused(small_ring):
    model = _model()
    tokens_1T = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache(1, 30)
        model(tokens_1T[:, :20], cache=cache, start=0)
        model(tokens_1T[:, 16:17], cache=cache, start=16)  # back by spare + 1 = 4 slots: fine
        with pytest.raises(ValueError, match="sliding-window cache: writing from slot 15"):
            model(tokens_1T[:, 15:16], cache=cache, start=15)
        model(tokens_1T[:, :3], cache=cache, start=0)  # a new sequence from slot 0 is fine


def test_sinks_and_windows_need_a_kind_that_has_them():
    with pytest.raises(ValueError, match="attention='mla' has no form with attention_sinks=True"):
        ModelConfig(attention="mla", n_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                    v_head_dim=4, attention_sinks=True)
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        ModelConfig(n_layers=2, layer_types=("sliding", "full"), sliding_window=0)


def test_training_gradients_reach_the_sinks():
    model = _model().train()
    tokens_BT = torch.randint(0, VOCAB, (2, 16))
    logits = model(tokens_BT)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens_BT[:, 1:].reshape(-1)).backward()
    assert all(block.attn.sinks.grad.abs().sum() > 0 for block in model.layers)
