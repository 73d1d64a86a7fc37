"""The paged KV cache and prefix caching of the engine: equality with `generate` and bitwise
batch invariance with prefix hits and preemption, block accounting, hand-counted hit metrics,
MLA through the paged pool, and a layer cache that is not paged (row pool, no prefix caching)."""

import random

import pytest

from moekit.cache import KVLayerCache
from moekit.engine import Engine, SamplingParams
from moekit.generate import generate
from moekit.server.metrics import render
from test_engine import tiny_model  # the same seeded, scaled tiny model

PROMPTS = [[5, 17, 300, 42, 7, 99, 1], [8, 3], [250, 251, 252, 253], [11] * 70, list(range(1, 40)), [400]]
KW = dict(prefill_chunk=16, max_step_tokens=48)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def sequential(model, prompts, n):
    return [generate(model, [p], max_new_tokens=n)[0] for p in prompts]


def assert_no_leak(engine):
    """Every block free or cached-unreferenced, every row free, nothing running."""
    m, blocks = engine.metrics(), engine.kv.blocks
    assert m["running"] == 0 and m["kv_blocks_in_use"] == 0 and m["kv_reserved_tokens"] == 0
    assert len(blocks.free) + len(blocks.lru) == blocks.num_blocks
    assert sum(blocks.refs) == 0 and len(set(blocks.free) | set(blocks.lru)) == blocks.num_blocks
    assert sorted(engine.kv.free_rows) == list(range(engine.kv.rows))


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_preemption_under_a_tiny_budget_equals_generate(model, batch_invariant):
    """7 blocks of 4 tokens: each request (up to 7 + 16 tokens) fits alone, the four together
    outgrow the budget as they decode: the newest are preempted and recomputed, with no error
    and the tokens generate gives (recomputed by decode steps under batch invariance, by prefill
    under plain numerics)."""
    prompts = PROMPTS[:3] + PROMPTS[5:]
    engine = Engine(model, kv_budget=28, block_size=4, batch_invariant=batch_invariant, **KW)
    out = engine.generate(prompts, SamplingParams(max_tokens=16))
    assert [o.token_ids for o in out] == sequential(model, prompts, 16)
    assert all(o.finish_reason == "length" for o in out)
    m = engine.metrics()
    assert m["preemptions"] > 0 and m["kv_blocks_total"] == 7
    assert_no_leak(engine)


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_prefix_hits_equal_generate_and_are_counted(model, batch_invariant):
    """Hand-counted hits: blocks of 4, chunks of 8. A (21 tokens) runs first. Batch-invariant, only
    whole prefill chunks register ([0, 8), [8, 16): 4 blocks) and hits round down to chunks; plain,
    every computed full block registers (A computed 21 + 2 tokens: 5 blocks)."""
    a = list(range(100, 121))  # 21 tokens
    b = a[:20] + [7, 8, 9, 10, 11]  # shares 20 tokens (5 blocks) with A
    c = list(a)  # A again: the last token is always computed
    engine = Engine(model, block_size=4, prefill_chunk=8, max_step_tokens=32, batch_invariant=batch_invariant)
    sp = SamplingParams(max_tokens=3)
    got = [engine.generate([p], sp)[0].token_ids for p in (a, b, c)]
    assert got == sequential(model, [a, b, c], 3)
    hits_b, hits_c = (16, 16) if batch_invariant else (20, 20)
    m = engine.metrics()
    assert m["totals"]["prefix_hit_tokens"] == hits_b + hits_c
    assert m["prefix_cache_hit_rate"] == (hits_b + hits_c) / (len(a) + len(b) + len(c))
    # invariant: A's 4 + B's chunk [16, 24) (2 blocks); plain: A's 5 + B's block of tokens 20..23
    assert m["kv_blocks_cached"] == 6
    assert_no_leak(engine)
    text = render(m, {})
    for name in ("moekit_prefix_cache_hit_rate", "moekit_kv_cache_blocks_in_use", "moekit_kv_cache_blocks_total",
                 "moekit_kv_cache_blocks_cached", "moekit_preemptions_total"):
        assert f"\n{name} " in text


def test_bitwise_batch_invariance_with_prefix_hits_and_preemption():
    """Unscaled model (near-ties everywhere): requests sharing a 40-token system prompt, greedy and
    seeded sampling, joining at random steps, under a budget that forces preemptions: each
    request's tokens and logprobs are bitwise those it gets alone in a fresh engine."""
    model = tiny_model(scaled=False)
    V = model.cfg.vocab_size
    rng = random.Random(0)
    system = [rng.randrange(V) for _ in range(40)]
    prompts = [system + [rng.randrange(V) for _ in range(rng.randint(1, 20))] for _ in range(5)]
    params = [SamplingParams(max_tokens=16, logprobs=True, temperature=rng.choice([0.0, 0.9]), seed=i)
              for i in range(5)]
    kw = dict(block_size=8, **KW)
    alone = [Engine(model, **kw).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine(model, kv_budget=160, **kw)  # 20 blocks: each request needs up to 10 (4 shared)
    handles = []
    for p, sp in zip(prompts, params):
        handles.append(engine.submit(p, sp))
        for _ in range(rng.randint(0, 3)):
            engine.step()
    together = [h.result() for h in handles]
    m = engine.metrics()
    assert m["preemptions"] > 0 and m["totals"]["prefix_hit_tokens"] > 0
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs  # exact float equality at every step
    assert_no_leak(engine)


def test_cancel_and_finish_release_every_block(model):
    engine = Engine(model, kv_budget=64, block_size=4, max_batch=2, **KW)
    handles = [engine.submit(p, SamplingParams(max_tokens=30)) for p in PROMPTS[:3]]
    for _ in range(4):
        engine.step()
    handles[0].cancel()
    handles[2].cancel()  # still waiting
    engine.run_until_idle()
    assert handles[0].result().finish_reason == "cancelled" and handles[1].result().finish_reason == "length"
    assert engine.metrics()["queue_depth"] == 0
    assert_no_leak(engine)


def test_mla_through_the_paged_engine_equals_generate():
    model = tiny_model(preset="mla-tiny")
    prompts = [PROMPTS[0], PROMPTS[4], PROMPTS[4][:33] + [3, 4]]  # the third hits the second's blocks
    engine = Engine(model, kv_budget=96, block_size=8, **KW)
    out = [engine.generate([p], SamplingParams(max_tokens=8))[0].token_ids for p in prompts]
    assert out == sequential(model, prompts, 8)
    assert engine.metrics()["totals"]["prefix_hit_tokens"] == 32
    assert_no_leak(engine)


class RowOnlyKV(KVLayerCache):
    """A layer cache that declares itself not paged: the engine keeps it in a row pool."""

    paged = False


def test_a_layer_cache_that_is_not_paged_uses_the_row_pool(model):
    def row_cache(batch, max_len, dtype, device, attn=model.layers[0].attn):
        cfg = attn.cfg
        return RowOnlyKV.allocate(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device)

    model.layers[0].attn.new_cache = row_cache
    try:
        engine = Engine(model, kv_budget=28, block_size=4, **KW)
        assert engine.kv.paged == [False, True]
        prompts = PROMPTS[:3] + PROMPTS[5:]
        out = engine.generate(prompts, SamplingParams(max_tokens=16))
        assert [o.token_ids for o in out] == sequential(model, prompts, 16)
        m = engine.metrics()
        assert not m["prefix_caching"] and "RowOnlyKV" in m["prefix_caching_note"] and m["preemptions"] > 0
    finally:
        del model.layers[0].attn.new_cache
    assert_no_leak(engine)


def test_a_budget_smaller_than_one_block_is_refused(model):
    with pytest.raises(ValueError, match="holds no block of block_size=16"):
        Engine(model, kv_budget=8)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        Engine(model, block_size=0)
