"""The continuous-batching engine (moekit.engine): batching vs sequential generate, batch
invariance (bitwise), admission control, cancellation, sampling, stopping, threading."""

import inspect
import random
import threading

import pytest
import torch
import torch.nn.functional as F

from moekit import ModelConfig, Transformer
from moekit.engine import (ContextLengthError, Engine, KVBudgetError, ParamError, QueueFullError,
                           SamplingParams)
from moekit.moe.invariant import experts_invariant
from moekit import cpu_matvec
from moekit.numerics import PLAIN, batch_invariant, gemm_row_quantum, pad_rows, rows_multiplied
from moekit.engine.kv import parse_budget
from moekit.engine.text import TextStream
from moekit.generate import generate

PROMPTS = [[5, 17, 300, 42, 7, 99, 1], [8, 3], [250, 251, 252, 253], [11] * 70, list(range(1, 40)), [400]]
KW = dict(prefill_chunk=16, max_step_tokens=48)  # small chunks: long prompts take several steps


def tiny_model(scaled: bool = True, preset: str = "tiny", **overrides) -> Transformer:
    """Tiny random model; `scaled` spreads the logits (no near-ties: greedy comparisons with
    `generate`, whose GEMMs differ in the last bits, are then exact)."""
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.preset(preset, **overrides))
    if scaled:
        with torch.no_grad():
            model.lm_head.weight.mul_(50.0)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers")
    import argparse

    from moekit.data import train_tokenizer

    return train_tokenizer([inspect.getsource(argparse)], 512, progress=False)


def sequential(model, prompts, n):
    return [generate(model, [p], max_new_tokens=n)[0] for p in prompts]


# ---------------------------------------------------------------------------- the platform property
def test_padded_gemm_rows_do_not_depend_on_the_other_rows():
    """The property batch invariance rests on (see moekit/numerics.py): with the row count padded
    to a multiple of q, a GEMM row's bits are a function of that row alone. If this
    fails on a new machine/BLAS, the engine's bitwise guarantee does not hold there. The quantum is measured
    (`gemm_row_quantum`, on other shapes and data): this checks the measurement holds beyond its probe."""
    torch.manual_seed(0)
    q = batch_invariant().row_quantum
    for d_in, d_out in [(64, 512), (256, 768), (64, 8)]:
        w = torch.randn(d_out, d_in)
        x = torch.randn(96, d_in)
        canon = torch.cat([F.linear(x[i:i + q], w) for i in range(0, 96, q)])
        for m in (1, 2, 3, 5, 7, 9, 13, 30, 61, 96):
            rows = torch.randperm(96)[:m]
            assert torch.equal(F.linear(pad_rows(x[rows], q), w)[:m], canon[rows]), (d_in, d_out, m)


def test_both_expert_paths_give_the_same_bits():
    """experts_invariant loops over the active experts when few are (decoding alone) and runs a padded
    bmm grid when most are (a busy batch): a token's output must not depend on which."""
    torch.manual_seed(0)
    E, K, D, Fe = 16, 4, 64, 32
    w13, w2 = torch.randn(E, 2 * Fe, D), torch.randn(E, D, Fe)
    x = torch.randn(40, D)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(40)])
    gates = torch.rand(40, K)
    together = experts_invariant(x, w13, w2, idx, gates, batch_invariant())  # every expert active: the grid
    for t in (0, 17, 39):
        alone = experts_invariant(x[t:t + 1], w13, w2, idx[t:t + 1], gates[t:t + 1], batch_invariant())  # 4 of 16: the loop
        assert torch.equal(alone[0], together[t])
    ref = sum(gates[0, k] * (w2[e] @ (F.silu(w13[e, :Fe] @ x[0]) * (w13[e, Fe:] @ x[0])))
              for k, e in enumerate(idx[0].tolist()))
    torch.testing.assert_close(together[0], ref, rtol=1e-4, atol=1e-4)


def test_uneven_loads_take_the_loop_with_the_same_bits(monkeypatch):
    """Every expert active but one much busier (padding all to it would more than double the rows): the
    loop, not the grid; a token's bits are those it gets alone."""
    torch.manual_seed(1)
    E, K, D, Fe, T = 16, 4, 64, 32, 96
    w13, w2 = torch.randn(E, 2 * Fe, D), torch.randn(E, D, Fe)
    x = torch.randn(T, D)
    idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(E - 1)[:K - 1]])
                       for _ in range(T)])  # expert 0 in every token
    gates = torch.rand(T, K)
    grids = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: grids.append(1) or real_bmm(*a))
    together = experts_invariant(x, w13, w2, idx, gates, batch_invariant())
    assert not grids  # the loop
    for t in (0, 50, 95):
        alone = experts_invariant(x[t:t + 1], w13, w2, idx[t:t + 1], gates[t:t + 1], batch_invariant())
        assert torch.equal(alone[0], together[t])
    even_TK = (torch.arange(40)[:, None] * K + torch.arange(K)) % E  # 10 pairs per expert
    even = experts_invariant(x[:40], w13, w2, even_TK, gates[:40], batch_invariant())
    assert grids and even.shape == (40, D)  # even loads: the grid


# ---------------------------------------------------------------------------- greedy vs generate
def test_continuous_batching_equals_sequential_generate(model):
    engine = Engine(model, **KW)
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in out] == sequential(model, PROMPTS, 12)
    assert all(o.finish_reason == "length" and o.generated_tokens == 12 for o in out)
    assert [o.prompt_tokens for o in out] == [len(p) for p in PROMPTS]
    m = engine.metrics()
    assert m["running"] == 0 and m["queue_depth"] == 0 and m["kv_reserved_tokens"] == 0


def test_requests_join_and_leave_between_steps(model):
    engine = Engine(model, **KW)
    ref = sequential(model, PROMPTS, 10)
    lengths = [10, 3, 10, 6, 10, 1]  # different max_tokens: requests leave at different steps
    handles = []
    for i, p in enumerate(PROMPTS):
        handles.append(engine.submit(p, SamplingParams(max_tokens=lengths[i])))
        for _ in range(i % 3 + 1):  # the ones before run on while this one prefills
            engine.step()
    assert [h.result().token_ids for h in handles] == [r[:n] for r, n in zip(ref, lengths)]


@pytest.mark.parametrize("preset,quantize", [("tiny", None), ("small", None), ("tiny", "int4-g32")])
def test_batch_invariance_bitwise(preset, quantize):
    """Unscaled random models (near-ties everywhere): each request's log-probabilities are bitwise
    those it gets alone, with requests joining at random steps, greedy and seeded sampling mixed
    (also with weight-only quantized weights)."""
    model = tiny_model(scaled=False, preset=preset)
    if quantize:
        model = pytest.importorskip("moekit.quantize").quantize_model(model, quantize)
    V = model.cfg.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 60))] for _ in range(8)]
    params = [SamplingParams(max_tokens=12, logprobs=True, temperature=rng.choice([0.0, 0.9]), seed=i,
                             top_p=rng.choice([None, 0.9])) for i in range(8)]
    alone = [Engine(model, **KW).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine(model, **KW)
    handles = []
    for p, sp in zip(prompts, params):
        handles.append(engine.submit(p, sp))
        for _ in range(rng.randint(0, 3)):
            engine.step()
    together = [h.result() for h in handles]
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs  # exact float equality, every step


def test_rows_multiplied_names_the_products_over_rows():
    """The probe behind the decode bucket's size: torch's GEMMs and fused attention are named, row-wise work
    (norms, reductions per row, moekit's C matvec) is not."""
    x, w = torch.randn(3, 64), torch.randn(32, 64)
    assert rows_multiplied(lambda: F.linear(x, w)) in (["aten::mm.default"], ["aten::addmm.default"])
    assert rows_multiplied(lambda: torch.einsum("bk,nk->bn", x, w)) != []
    q = torch.randn(1, 2, 3, 8)
    assert rows_multiplied(lambda: F.scaled_dot_product_attention(q, q, q)) != []
    assert rows_multiplied(lambda: (F.rms_norm(x, (64,)) * x).sum(-1).softmax(-1).topk(2)) == []
    if cpu_matvec.available():
        y = cpu_matvec.qmatvec("f32", x, w, None, None)
        assert rows_multiplied(lambda: cpu_matvec.qmatvec("f32", x, w, None, None)) == []
        torch.testing.assert_close(y, F.linear(x, w))


@pytest.mark.skipif(not cpu_matvec.available(), reason=f"moekit's C kernels: {cpu_matvec.error()}")
@pytest.mark.parametrize("preset,rowwise", [("tiny", True), ("mla-tiny", False)])
def test_lone_request_decodes_in_a_bucket_of_two_where_rows_are_computed_alone(preset, rowwise):
    """float32 on the CPU: every projection of the invariant step goes through the C matvec and attention through
    the paged C kernel, so a lone request decodes in a bucket of 2 rows rather than the GEMM row quantum's; MLA's
    absorbed products are GEMMs over the rows, so its buckets stay multiples of the quantum. Both get the bits
    they get co-batched."""
    model = tiny_model(scaled=False, preset=preset)
    engine = Engine(model, **KW)
    q = engine.numerics.row_quantum
    expected = 2 if rowwise else q
    assert engine.decode_step.quantum == expected
    params = SamplingParams(max_tokens=6, logprobs=True)
    alone = engine.generate([PROMPTS[0]], params)[0]
    assert {B for B, _ in engine.kv.views} == {q, expected}  # the probe's bucket, then the lone request's
    together = engine.generate(PROMPTS[:3] + [PROMPTS[0]], params)[-1]
    assert alone.token_ids == together.token_ids and alone.logprobs == together.logprobs


def test_compiled_invariant_step_is_one_graph_for_every_bucket_and_request_count(model):
    """The compiled batch-invariant decode step compiles once: a lone request (one active row: an unbacked row
    count, no graph of its own), then 3 and 6 requests (buckets of 4 and 8 rows) run the same generated code, which
    is what makes their rows' bits agree; a one-row graph apart once summed a hybrid model's layers in another
    order.
    Also after a torch._dynamo.reset(), which drops dynamo's compile callbacks (they make the trace settings);
    the step's replay of its last call (runtime.Replay) is released so that the next call compiles again."""
    stats = torch._dynamo.utils.counters["stats"]
    engine = Engine(model, compile=True, **KW)
    params = SamplingParams(max_tokens=4, logprobs=True)
    engine.generate([PROMPTS[0]], params)
    torch._dynamo.reset()
    engine.decode_step.fn.release()
    alone = engine.generate([PROMPTS[0]], params)[0]
    graphs = stats["unique_graphs"]
    together = engine.generate(PROMPTS[:3], params)[0]
    engine.generate(PROMPTS, params)
    assert stats["unique_graphs"] == graphs
    assert alone.logprobs == together.logprobs


# ---------------------------------------------------------------------------- sampling
def test_the_decode_steps_compiled_argmax_picks_as_the_eager_one():
    """The engine's greedy choice is made inside its (compiled) decode step (`packed_decode_step`); inductor's
    argmax must pick what eager `greedy` picks: the first of tied maxima, the first NaN, index 0 of a row of -inf,
    the first +inf, for one row and several (dynamic sizes)."""
    from moekit.runtime import compile_fn
    from moekit.sampling import greedy

    x_RV = torch.randn(6, 4096)
    x_RV[0, [7, 900, 3000]] = 50.0
    x_RV[1, [11, 2000]] = float("nan")
    x_RV[2] = float("-inf")
    x_RV[3] = 1.0
    x_RV[4, [5, 4000]] = float("inf")
    x_RV[5, 4095] = 99.0
    compiled = compile_fn(lambda logits: greedy(logits), True, torch.device("cpu"))
    with torch.inference_mode():
        assert compiled(x_RV).tolist() == greedy(x_RV).tolist() == [7, 11, 0, 0, 5, 4095]
        assert compiled(x_RV[1:3]).tolist() == [11, 0]


def test_seeded_sampling_is_reproducible_regardless_of_co_batched_requests(model):
    sp = SamplingParams(max_tokens=10, temperature=1.3, top_k=50, seed=7)
    alone = Engine(model, **KW).generate([PROMPTS[0]], sp)[0].token_ids
    noise = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in range(len(PROMPTS) - 1)]
    mixed = Engine(model, **KW).generate(PROMPTS[1:] + [PROMPTS[0]], noise + [sp])[-1].token_ids
    assert alone == mixed
    # the same draws as generate() with the same seed (per-request generator, same filters)
    assert alone == generate(model, [PROMPTS[0]], max_new_tokens=10, temperature=1.3, top_k=50, seed=7)[0]
    other = Engine(model, **KW).generate([PROMPTS[0]], sp.replace(seed=8))[0].token_ids
    assert other != alone


def test_n_sub_requests_use_consecutive_seeds(model):
    engine = Engine(model, **KW)
    sp = SamplingParams(max_tokens=8, temperature=1.5, seed=3)
    handles = engine.submit_n(PROMPTS[2], sp, n=3)
    outs = [h.result().token_ids for h in handles]
    assert len(set(map(tuple, outs))) == 3
    for i, out in enumerate(outs):
        assert Engine(model, **KW).generate([PROMPTS[2]], sp.replace(seed=3 + i))[0].token_ids == out


# ---------------------------------------------------------------------------- admission and cancellation
def test_admission_control_under_a_tiny_kv_budget(model):
    """4 blocks of 8 tokens: a request is admitted while blocks for its prompt are free beyond one
    growth block per running request; the others wait (first come first served)."""
    sp = SamplingParams(max_tokens=8)
    engine = Engine(model, kv_budget=32, block_size=8, **KW)
    handles = [engine.submit(p, sp) for p in PROMPTS[:3]]  # 1 prompt block each
    engine.step()
    m = engine.metrics()
    assert m["running"] == 2 and m["queue_depth"] == 1  # the third waits for room
    assert m["kv_blocks_total"] == 4 and m["kv_blocks_in_use"] == 2 and m["kv_reserved_tokens"] == 16
    # a request that could never fit is rejected at once, and nothing is queued for it
    with pytest.raises(KVBudgetError, match="KV budget"):
        engine.submit(PROMPTS[3], sp)  # 70 + 8 tokens > 32
    assert [h.result().token_ids for h in handles] == sequential(model, PROMPTS[:3], 8)
    assert engine.metrics()["kv_reserved_tokens"] == 0


def test_max_batch_limits_running_requests(model):
    engine = Engine(model, max_batch=2, **KW)
    handles = [engine.submit(p, SamplingParams(max_tokens=5)) for p in PROMPTS]
    for _ in range(3):
        engine.step()
        assert engine.metrics()["running"] <= 2
    assert [h.result().token_ids for h in handles] == sequential(model, PROMPTS, 5)


def test_cancellation_frees_the_slot(model):
    engine = Engine(model, max_batch=1, **KW)
    long = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200))
    waiting = engine.submit(PROMPTS[1], SamplingParams(max_tokens=5))
    for _ in range(5):
        engine.step()
    assert engine.metrics()["running"] == 1 and engine.metrics()["queue_depth"] == 1
    long.cancel()
    engine.step()  # the cancellation is applied at the step boundary, the waiting one is admitted
    assert long.done and long.result().finish_reason == "cancelled"
    assert 0 < len(long.result().token_ids) < 200
    assert waiting.result().token_ids == sequential(model, PROMPTS[1:2], 5)[0]
    # cancelling a request that is still queued
    first = engine.submit(PROMPTS[0], SamplingParams(max_tokens=50))
    queued = engine.submit(PROMPTS[2], SamplingParams(max_tokens=50))
    engine.step()
    queued.cancel()
    engine.step()
    assert queued.result().finish_reason == "cancelled" and queued.result().token_ids == []
    first.cancel()
    engine.run_until_idle()
    m = engine.metrics()
    assert m["running"] == 0 and m["queue_depth"] == 0 and m["kv_reserved_tokens"] == 0
    assert m["totals"]["finished_cancelled"] == 3


def test_queue_full_and_validation_errors(model):
    engine = Engine(model, max_queue=2, **KW)  # not stepping: submissions stay queued
    engine.submit(PROMPTS[0])
    engine.submit(PROMPTS[1])
    with pytest.raises(QueueFullError, match="max_queue=2"):
        engine.submit(PROMPTS[2])
    with pytest.raises(QueueFullError):
        engine.submit_n(PROMPTS[2], n=2)
    cases = [
        (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"),
        (dict(max_tokens=0), "max_tokens"), (dict(seed=1.5), "seed"), (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[[]]), "stop_token_ids"), (dict(stop_token_ids=[512]), "stop_token_ids"),
    ]
    fresh = Engine(model, **KW)
    for kwargs, param in cases:
        with pytest.raises(ParamError) as err:
            fresh.submit([1, 2], SamplingParams(**kwargs))
        assert err.value.param == param
    with pytest.raises(ParamError, match="stop strings need a tokenizer"):
        fresh.submit([1], SamplingParams(stop=["x"]))
    for bad in ([], [1, 512], [1.0], "text"):
        with pytest.raises(ParamError) as err:
            fresh.submit(bad)
        assert err.value.param == "prompt"
    with pytest.raises(ContextLengthError, match="maximum context length is 256") as err:
        fresh.submit([1] * 250, SamplingParams(max_tokens=7))
    assert err.value.param == "max_tokens"
    with pytest.raises(ContextLengthError) as err:
        fresh.submit([1] * 256)
    assert err.value.param == "prompt"
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, prefill_chunk=64, max_step_tokens=32)
    with pytest.raises(ValueError, match="KV budget"):
        Engine(model, kv_budget="12 parsecs")
    with pytest.raises(ValueError, match="row_quantum must be a power of two, got 12"):
        Engine(model, row_quantum=12)
    assert Engine(model, row_quantum=8).numerics.row_quantum == 8
    assert Engine(model).numerics.row_quantum == gemm_row_quantum()  # measured by default


def test_kv_budget_parsing(model):
    # 2 layers x 2 KV heads x 16 dims x (k, v) x 4 bytes = 512 bytes per token
    assert parse_budget(1000, model, torch.float32) == 1000
    assert parse_budget("1000", model, torch.float32) == 1000
    assert parse_budget("1MiB", model, torch.float32) == 2048
    assert parse_budget("1 MB", model, torch.bfloat16) == 1_000_000 // 256


# ---------------------------------------------------------------------------- stopping and streaming
def test_stop_token_ids_and_eos(model):
    full = Engine(model, **KW).generate(PROMPTS, SamplingParams(max_tokens=10))
    tok = full[0].token_ids[3]
    out = Engine(model, **KW).generate(PROMPTS, SamplingParams(max_tokens=10, stop_token_ids=[tok]))
    for o, f in zip(out, full):
        ids = f.token_ids
        assert o.token_ids == (ids[:ids.index(tok)] if tok in ids else ids)
        assert o.finish_reason == ("stop" if tok in ids else "length")
    eos = Engine(model, eos_token_ids=[tok], **KW).generate(PROMPTS[:1], SamplingParams(max_tokens=10))[0]
    assert eos.token_ids == out[0].token_ids and eos.finish_reason == "stop"
    ignored = Engine(model, eos_token_ids=[tok], **KW).generate(PROMPTS[:1],
                                                               SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert ignored.token_ids == full[0].token_ids
    pair = full[1].token_ids[4:6]
    seq = Engine(model, **KW).generate(PROMPTS[1:2], SamplingParams(max_tokens=10, stop_token_ids=[pair]))[0]
    assert seq.token_ids == full[1].token_ids[:4] and seq.generated_tokens == 6


def test_stop_strings_and_streamed_text(model, tokenizer):
    engine = Engine(model, tokenizer, **KW)
    prompt = tokenizer.encode("def parse_args(self, args=None):").ids
    full = engine.generate([prompt], SamplingParams(max_tokens=24))[0]
    assert full.text == tokenizer.decode(full.token_ids)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    assert stop and stop in full.text
    handle = engine.submit(prompt, SamplingParams(max_tokens=24, stop=[stop]))
    streamed = "".join(ev.text for ev in handle)  # iterating the handle drives the engine here
    res = handle.result()
    assert res.finish_reason == "stop" and res.text == full.text[:full.text.index(stop)]
    assert streamed == res.text  # the stop string never reached the stream
    events = []  # the same through a callback
    handle = engine.submit(prompt, SamplingParams(max_tokens=24, stop=[stop]), on_event=events.append)
    res = handle.result()
    assert "".join(ev.text for ev in events) == res.text and events[-1].completion is res
    assert [t for ev in events for t in ev.token_ids] == res.token_ids
    with pytest.raises(ValueError, match="on_event"):
        handle.next_event()


def test_text_stream_holds_back_possible_stop_prefixes():
    class Chars:  # a "tokenizer" whose ids are characters
        def decode(self, ids):
            return "".join(map(chr, ids))

    ts = TextStream(Chars(), stop=["END"])
    sent = ""
    for i, ch in enumerate("abcENxEND!"):
        hit = ts.update([ord(c) for c in "abcENxEND!"[:i + 1]])
        sent += ts.delta(final=hit)
        if hit:
            break
    assert sent == "abcENx" and ts.text == "abcENx"


# ---------------------------------------------------------------------------- background thread
def test_threaded_engine_serves_concurrent_submitters(model):
    ref = sequential(model, PROMPTS, 8)
    results = {}
    with Engine(model, **KW) as engine:
        def client(i):
            results[i] = engine.submit(PROMPTS[i], SamplingParams(max_tokens=8)).result(timeout=60).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        streamed = [ev.token_ids for ev in engine.submit(PROMPTS[0], SamplingParams(max_tokens=8))]
        m = engine.metrics()
        assert m["thread_alive"] and m["totals"]["generation_tokens"] >= 8 * len(PROMPTS)
        assert m["generation_tokens_per_s"] > 0
    assert [results[i] for i in range(len(PROMPTS))] == ref
    assert [t for ids in streamed for t in ids] == ref[0]


def test_paused_engine_queues_and_stop_cancels(model):
    engine = Engine(model, **KW).start()
    engine.pause()
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=4))
    assert handle.next_event(timeout=0.2) is None and engine.metrics()["queue_depth"] == 1
    engine.resume()
    assert handle.result(timeout=30).token_ids == sequential(model, PROMPTS[:1], 4)[0]
    engine.pause()
    pending = engine.submit(PROMPTS[1], SamplingParams(max_tokens=4))
    engine.stop()
    assert pending.result(timeout=5).finish_reason == "cancelled"


# ---------------------------------------------------------------------------- one request never takes the engine down
def test_extreme_sampling_values_run_and_leave_the_engine_serving(model):
    ref = sequential(model, PROMPTS[:1], 6)[0]
    with Engine(model, **KW) as engine:
        tiny_t = engine.submit(PROMPTS[0], SamplingParams(max_tokens=6, temperature=1e-38, seed=1))
        tiny_p = engine.submit(PROMPTS[0], SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-46, seed=1))
        assert tiny_t.result(timeout=60).token_ids == ref  # a vanishing temperature or nucleus is greedy
        assert tiny_p.result(timeout=60).token_ids == ref
        assert engine.metrics()["thread_alive"]


def test_a_failure_while_choosing_tokens_fails_only_that_request(model, monkeypatch):
    import moekit.engine.engine as engine_module

    real = engine_module.choose_tokens

    def faulty(logits_RV, seqs):  # fault injection: sampling for the request with seed 666 breaks
        if any(s.params.seed == 666 for s in seqs):
            raise RuntimeError("simulated sampling failure")
        return real(logits_RV, seqs)

    monkeypatch.setattr(engine_module, "choose_tokens", faulty)
    ref = sequential(model, PROMPTS[:2], 6)
    with Engine(model, **KW) as engine:
        bad = engine.submit(PROMPTS[2], SamplingParams(max_tokens=6, temperature=1.0, seed=666))
        good = [engine.submit(p, SamplingParams(max_tokens=6)) for p in PROMPTS[:2]]
        failed = bad.result(timeout=60)
        assert failed.finish_reason == "error" and "simulated sampling failure" in failed.error
        assert [h.result(timeout=60).token_ids for h in good] == ref
        assert engine.submit(PROMPTS[0], SamplingParams(max_tokens=6)).result(timeout=60).token_ids == ref[0]
        assert engine.metrics()["thread_alive"]


def test_presence_and_frequency_penalties_follow_a_per_token_loop():
    model = tiny_model(scaled=False)
    prompt, n = PROMPTS[0], 12

    def reference(presence, frequency):
        out = []
        for _ in range(n):
            with torch.no_grad():
                logits_V = model(torch.tensor([prompt + out]))[0, -1].float()
            for t in set(out):
                logits_V[t] -= presence + frequency * out.count(t)
            out.append(int(logits_V.argmax()))
        return out

    plain = reference(0.0, 0.0)
    assert len(set(plain)) < n  # greedy repeats itself on this model: the penalties have work to do
    for presence, frequency in ((2.0, 0.0), (0.0, 2.0), (1.0, 0.5)):
        sp = SamplingParams(max_tokens=n, presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True)
        got = Engine(model, **KW).generate([prompt], sp)[0].token_ids
        assert got == reference(presence, frequency) and got != plain


def test_warmup_moves_the_compiled_heap_out_of_the_collectors_reach(model):
    """After warmup every object then alive is frozen (gc.freeze): a full collection no longer scans the model
    and its compiled code, so it cannot pause the running requests for a fraction of a second."""
    import gc

    gc.unfreeze()
    try:
        engine = Engine(model)
        engine.warmup()
        assert gc.get_freeze_count() > 0
        assert engine.generate([[1, 2]], SamplingParams(max_tokens=2))[0].token_ids  # still serving
    finally:
        gc.unfreeze()


def test_a_process_that_warmed_an_engine_exits_without_leak_reports():
    """The heap frozen by warmup is thawed at exit, so the final collection runs (frozen extension objects,
    e.g. those of the compiler's bindings, were otherwise reported as leaked on every server exit)."""
    import subprocess
    import sys

    code = ("from moekit import Transformer, ModelConfig\nfrom moekit.engine import Engine\n"
            "Engine(Transformer(ModelConfig.preset('tiny')).eval(), compile=True).warmup()\nprint('served')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "served", out.stderr[-2000:]
    assert "leak" not in out.stderr, out.stderr[-2000:]


def test_the_default_falls_back_to_plain_numerics_where_gemm_rows_cannot_be_made_invariant(caplog):
    """bfloat16 GEMMs on CPU: where no row padding makes a row's bits independent of the batch (MKL on an Intel
    Xeon with AMX), the default engine warns and runs plain numerics and batch_invariant=True refuses; where
    one does, both run invariant with that quantum."""
    model = Transformer(ModelConfig.preset("tiny")).to(torch.bfloat16)
    q = gemm_row_quantum("cpu", torch.bfloat16)
    if q is None:
        with caplog.at_level("WARNING", logger="moekit.engine.engine"):
            assert Engine(model).numerics == PLAIN
        assert "batch-invariant numerics are not available here" in caplog.text
        with pytest.raises(ValueError, match="no row padding up to 64 makes a torch.bfloat16 GEMM row's bits"):
            Engine(model, batch_invariant=True)
    else:
        assert Engine(model).numerics.row_quantum == Engine(model, batch_invariant=True).numerics.row_quantum == q
    assert Engine(model, batch_invariant=False).numerics == PLAIN
