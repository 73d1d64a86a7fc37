"""Routed experts (issue 17): the experts each generated token went to, recorded in the engine's one
forward (eager prefill, static decode step, compiled), returned by `moekit serve` to the official
openai client, and replayed in a training forward (`model(tokens, routed_experts=...)`).

The reference is independent of the recording: the model run token by token through its cache,
each MoE layer's routing read by a forward hook on its router."""

import inspect
import signal

import pytest
import torch

from moekit import ModelConfig, Transformer, save_model
from moekit.engine import Engine, ParamError, SamplingParams
from moekit.numerics import PLAIN

openai = pytest.importorskip("openai")
pytest.importorskip("tokenizers")

from moekit.server import cli as serve_cli  # noqa: E402

NAME = "tiny-routed"


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=256, **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # well-separated logits: exact greedy comparisons
    return model.eval()


@torch.no_grad()
def reference_routing(model, tokens) -> torch.Tensor:
    """(T, L, K): token t fed alone (cache of the tokens before it), each MoE layer's top-k read
    off its router by a forward hook."""
    seen = []
    hooks = [moe.router.register_forward_hook(lambda mod, args, out: seen.append(out.expert_idx_TK.clone()))
             for moe in model.moe_layers()]
    try:
        cache = model.new_cache(1, len(tokens))
        rows = []
        for t, tok in enumerate(tokens):
            seen.clear()
            model(torch.tensor([[tok]]), cache=cache, start=t)
            rows.append(torch.stack([ids[0] for ids in seen]))  # (L, K)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(rows)


def check_against_reference(model, prompt, completion):
    """Entry i is generated token i's routing when it was fed: the reference at position P + i;
    every returned token but an unfed last one has its entry."""
    ref = reference_routing(model, prompt + completion.token_ids)
    n, got = len(completion.token_ids), completion.routed_experts
    assert len(got) == (n - 1 if completion.finish_reason == "length" else n)
    assert torch.equal(torch.tensor(got, dtype=torch.long).view(len(got), *ref.shape[1:]),
                       ref[len(prompt):len(prompt) + len(got)])


PROMPTS = [[5, 17, 3, 99, 42, 7, 8, 1, 2, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71], [11, 12, 13], [40] * 9]


# ---------------------------------------------------------------------------- engine
def test_engine_records_each_fed_token_and_is_batch_invariant():
    model = tiny_model()
    engine = Engine(model, max_batch=4, prefill_chunk=8, block_size=4, return_routed_experts=True)
    params = SamplingParams(max_tokens=7, ignore_eos=True, return_routed_experts=True)
    together = engine.generate(PROMPTS, params)  # co-batched: prefill chunks and decode rows side by side
    for prompt, c in zip(PROMPTS, together):
        check_against_reference(model, prompt, c)
    alone = engine.generate([PROMPTS[0]], params)[0]  # alone, and now with prefix-cache hits
    assert alone.token_ids == together[0].token_ids and alone.routed_experts == together[0].routed_experts
    assert engine.metrics()["prefix_cache_hit_rate"] > 0
    plain = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert plain.routed_experts is None  # only when asked


def test_a_removed_stop_id_was_the_unfed_token_and_streamed_entries_add_up():
    model = tiny_model()
    engine = Engine(model, max_batch=2, return_routed_experts=True)
    base = SamplingParams(max_tokens=8, ignore_eos=True, return_routed_experts=True)
    full = engine.generate([PROMPTS[2]], base)[0]
    j = next(i for i, t in enumerate(full.token_ids) if i >= 2 and t not in full.token_ids[:i])
    stopped = engine.generate([PROMPTS[2]], base.replace(stop_token_ids=[full.token_ids[j]]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:j]
    assert stopped.routed_experts == full.routed_experts[:j]  # every returned token was fed
    check_against_reference(model, PROMPTS[2], stopped)
    events = list(engine.submit(PROMPTS[2], base))
    assert sum((e.routed_experts for e in events), []) == full.routed_experts
    assert events[0].routed_experts == []  # the first token is not fed yet when it is sent


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_preempted_and_recomputed_requests_keep_one_entry_per_fed_token(batch_invariant):
    """7 blocks of 4 tokens: the requests outgrow them while decoding; the newest are preempted and
    recomputed (by decode steps under batch invariance, by prefill under plain numerics)."""
    model = tiny_model()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [2, 7, 1]]
    engine = Engine(model, kv_budget=28, block_size=4, batch_invariant=batch_invariant, return_routed_experts=True)
    out = engine.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True, return_routed_experts=True))
    assert engine.metrics()["preemptions"] > 0
    for prompt, c in zip(prompts, out):
        check_against_reference(model, prompt, c)


def test_engine_without_the_option_refuses_the_request():
    engine = Engine(tiny_model(), max_batch=2)
    with pytest.raises(ParamError, match="--enable-return-routed-experts"):
        engine.submit([1, 2], SamplingParams(return_routed_experts=True))


@pytest.mark.slow
def test_compiled_decode_step_records_the_same_experts():
    """The engine's compiled (fullgraph) decode step returns the routing as an output."""
    model = tiny_model()
    params = SamplingParams(max_tokens=5, ignore_eos=True, return_routed_experts=True)
    eager = Engine(model, max_batch=4, return_routed_experts=True).generate(PROMPTS, params)
    compiled = Engine(model, max_batch=4, return_routed_experts=True, compile=True).generate(PROMPTS, params)
    for prompt, e, c in zip(PROMPTS, eager, compiled):
        assert c.token_ids == e.token_ids and c.routed_experts == e.routed_experts
        check_against_reference(model, prompt, c)


def test_static_decode_step_returns_the_routing_of_the_real_rows():
    model = tiny_model()
    tokens = [[3, 9], [4, 10], [5, 11], [6, 12]]  # 4 rows, each a 2-token sequence; the last row is padding
    cache = model.new_cache(4, 8)
    with torch.no_grad():
        model(torch.tensor([[t[0]] for t in tokens]), cache=cache, start=0)
        logits_RV, routed_BLK = model.decode_step(
            torch.tensor([[t[1]] for t in tokens]), torch.ones(4, 1, dtype=torch.long), torch.ones(4, dtype=torch.long),
            torch.ones(4, 8, dtype=torch.bool), cache, static=False, active_rows=torch.tensor([0, 1, 2]), routing=True)
    assert logits_RV.shape == (3, model.cfg.vocab_size)  # the logits of the active rows, the routing of all
    for b, t in enumerate(tokens[:3]):  # (the padding row starts from zeros: its routing means nothing)
        assert torch.equal(routed_BLK[b], reference_routing(model, t)[1])


# ---------------------------------------------------------------------------- replay
def test_replay_gives_the_same_experts_and_logits_and_gradients_reach_the_router():
    model = tiny_model()
    tokens_1T = torch.tensor([PROMPTS[0]])
    free_1TLK = model.routed_experts(tokens_1T)
    assert torch.equal(free_1TLK[0], reference_routing(model, PROMPTS[0]))
    replay = free_1TLK.clone()
    replay[:, :5] = -1  # rows of -1: the router's own choice
    assert torch.equal(model(tokens_1T, routed_experts=replay), model(tokens_1T))
    assert torch.equal(model.routed_experts(tokens_1T, routed_experts=replay), free_1TLK)
    # other experts: taken as given, logits change, and the gates still train the router
    E = model.cfg.moe.num_experts
    other = (free_1TLK + 1) % E
    assert torch.equal(model.routed_experts(tokens_1T, routed_experts=other), other)
    model.train()
    logits = model(tokens_1T, routed_experts=other)
    assert not torch.allclose(logits, model(tokens_1T))
    logits.logsumexp(-1).mean().backward()
    grad = model.moe_layers()[0].router.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.eval()


def test_forced_gates_are_the_routers_softmax_over_the_given_experts():
    """softmax_topk with norm_topk_prob: gate_k = softmax over the chosen experts' logits (by hand)."""
    router = tiny_model().moe_layers()[0].router
    assert router.name == "softmax_topk" and router.cfg.norm_topk_prob
    x_TD = torch.randn(5, router.cfg.d_model)
    forced_TK = torch.tensor([[0, 1], [7, 2], [-1, -1], [3, 4], [6, 5]])
    routing = router(x_TD, None, PLAIN, forced_TK)
    logits_TE = x_TD @ router.weight.T
    own_TK = torch.topk(torch.softmax(logits_TE, -1), 2, dim=-1).indices
    want_TK = torch.where(forced_TK < 0, own_TK, forced_TK)
    assert torch.equal(routing.expert_idx_TK, want_TK)
    gates_TK = torch.softmax(logits_TE.gather(1, want_TK), dim=-1)
    torch.testing.assert_close(routing.gates_TK, gates_TK)


@pytest.mark.parametrize("bad, message", [
    (lambda r: r[..., :1], "shape"),
    (lambda r: r.float(), "shape|integer"),
    (lambda r: torch.full_like(r, 99), r"\[0, 8\)"),
    (lambda r: torch.zeros_like(r), "repeats an expert"),
])
def test_bad_replay_ids_are_refused_with_a_message(bad, message):
    model = tiny_model()
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=message):
        model(tokens, routed_experts=bad(model.routed_experts(tokens)))


# ---------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import argparse

    from moekit.data import train_tokenizer

    model = tiny_model()
    model.tokenizer = train_tokenizer([inspect.getsource(argparse)], 512, progress=False)
    path = tmp_path_factory.mktemp("routed") / "ckpt"
    save_model(model, path)
    return path, model


def start_server(path, *flags):
    args = serve_cli.build_parser().parse_args(
        ["--checkpoint", str(path), "--port", "0", "--model-name", NAME, "--quiet",
         "--threads", str(torch.get_num_threads()), *flags])
    server, _ = serve_cli.build_server(args)
    return server.start()


@pytest.fixture(scope="module")
def client(checkpoint):
    server = start_server(checkpoint[0], "--enable-return-routed-experts", "--prefill-chunk", "8")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    server.shutdown()


def test_openai_client_gets_routed_experts_that_replay_to_the_same_logits(checkpoint, client):
    _, model = checkpoint
    prompt = model.tokenizer.encode("def parse_args(self, args=None):").ids
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True, "return_routed_experts": True})
    choice = reply.choices[0]
    routed = choice.model_extra["routed_experts"]
    ids = model.tokenizer.encode(choice.text, add_special_tokens=False).ids
    tokens = prompt + ids
    ref = reference_routing(model, tokens)
    assert len(routed) == len(ids) - 1 and torch.equal(torch.tensor(routed), ref[len(prompt):len(tokens) - 1])
    # replay in a training forward: the served routing at the completion's positions, the rest free
    replay_1TLK = torch.full((1, len(tokens), *ref.shape[1:]), -1, dtype=torch.long)
    replay_1TLK[0, len(prompt):len(tokens) - 1] = torch.tensor(routed)
    tokens_1T = torch.tensor([tokens])
    assert torch.equal(model.routed_experts(tokens_1T, routed_experts=replay_1TLK)[0], ref)
    assert torch.equal(model(tokens_1T, routed_experts=replay_1TLK), model(tokens_1T))
    # streamed: the chunks' entries add up to the same list
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True, "return_routed_experts": True}))
    assert sum((c.choices[0].model_extra["routed_experts"] for c in chunks), []) == routed
    # chat too; a request that does not ask gets no field
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, extra_body={"return_routed_experts": True})
    got = chat.choices[0].model_extra["routed_experts"]
    assert len(got) in (chat.usage.completion_tokens - 1, chat.usage.completion_tokens)
    assert all(len(entry) == len(model.moe_layers()) and len(entry[0]) == model.cfg.moe.top_k for entry in got)
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert "routed_experts" not in (plain.choices[0].model_extra or {})


def test_without_the_server_flag_a_request_asking_gets_400_naming_it(checkpoint):
    """The real `moekit serve` command, started without --enable-return-routed-experts."""
    from test_server_abuse import serve_process

    proc, port = serve_process(checkpoint[0], name=NAME)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        for call in (lambda: c.completions.create(model=NAME, prompt="import sys", max_tokens=2,
                                                  extra_body={"return_routed_experts": True}),
                     lambda: c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=2, extra_body={"return_routed_experts": True})):
            with pytest.raises(openai.BadRequestError) as err:
                call()
            body = err.value.body
            assert body["param"] == "return_routed_experts" and "--enable-return-routed-experts" in body["message"]
        assert c.completions.create(model=NAME, prompt="import sys", max_tokens=2).choices[0].finish_reason
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
