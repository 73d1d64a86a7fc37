"""moekit.sampling: the logits processors against hand-worked examples, stop / prompt handling,
the engine's per-row choice, and one set of parameter checks shared by generate, the engine and
the server (the same bad value is refused everywhere with the same message)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.engine import Engine, ParamError, SamplingParams
from moekit.generate import generate
from moekit.sampling import (SamplingParamError, apply_repetition_penalty, apply_temperature, check_sampling,
                             choose_tokens, draw, ends_with_stop, filter_logits, filtered_probs, greedy,
                             new_generator, normalise_prompts, normalise_stops, sample_next, top_k_filter,
                             min_p_filter, top_p_filter)
from moekit.server.app import ServerContext, engine_error
from moekit.server.chat_template import default_template
from moekit.server.protocol import ApiError, parse_completion
from moekit.speculative import speculative_generate

NAME = "tiny-test"


def kept(logits):
    """Indices of the finite entries of a one-row logits tensor."""
    return (~logits.isinf()).nonzero()[:, 1].tolist()


# ---------------------------------------------------------------------------- processors by hand
def test_top_p_keeps_the_smallest_set_reaching_p():
    # softmax(log p) = p: probabilities 0.1, 0.4, 0.05, 0.3, 0.15 (sorted: 1, 3, 4, 0, 2)
    logits = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]]).log()
    assert kept(top_p_filter(logits, 0.35)) == [1]  # 0.4 alone reaches 0.35
    assert kept(top_p_filter(logits, 0.05)) == [1]  # never fewer than one token
    assert kept(top_p_filter(logits, 0.6)) == [1, 3]  # 0.4 < 0.6 <= 0.4 + 0.3
    assert kept(top_p_filter(logits, 0.8)) == [1, 3, 4]  # 0.7 < 0.8 <= 0.85
    assert kept(top_p_filter(logits, 0.9)) == [0, 1, 3, 4]  # 0.85 < 0.9 <= 0.95
    assert torch.equal(top_p_filter(logits, 1.0), logits) and torch.equal(top_p_filter(logits, None), logits)
    # the kept logits are untouched
    out = top_p_filter(logits, 0.6)
    assert out[0, 1] == logits[0, 1] and out[0, 3] == logits[0, 3]


def test_repetition_penalty_sign_rule():
    logits = torch.tensor([[2.0, -1.0, 0.0, 4.0, -3.0]])
    seen = torch.tensor([[True, True, True, False, False]])
    # seen: positive / 2, negative * 2, zero stays zero; unseen: untouched
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.0, 4.0, -3.0]]
    # a penalty < 1 favours seen tokens by the same rule
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -0.5, 0.0, 4.0, -3.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert kept(top_k_filter(logits, 1)) == [0, 2]  # both 3.0s tie for first
    assert kept(top_k_filter(logits, 2)) == [0, 2]
    assert kept(top_k_filter(logits, 3)) == [0, 2, 3]
    assert torch.equal(top_k_filter(logits, 4), logits) and torch.equal(top_k_filter(logits, None), logits)
    # rows are independent
    two = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 5.0, 1.0, 2.0]])
    assert (~top_k_filter(two, 2).isinf()).tolist() == [[True, False, True, False], [False, True, False, True]]


def test_temperature_then_top_k_then_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.equal(apply_temperature(logits, 2.0), (logits - 2.0) / 2.0)  # shifted: the max becomes 0
    # top-k before top-p: with k=2 the nucleus is computed over the two survivors only
    expect = top_p_filter(top_k_filter((logits - 2.0) / 0.5, 2), 0.9)
    assert torch.equal(filter_logits(logits, 0.5, 2, 0.9), expect)
    assert kept(filter_logits(logits, 0.5, 2, 0.9)) == [0, 1]
    # at temperature 0.5 token 0 has e^2 / (e^2 + 1) = 0.88 of the two: p = 0.85 keeps it alone
    assert kept(filter_logits(logits, 0.5, 2, 0.85)) == [0]
    probs = filtered_probs(logits, 0.5, 2, None)
    assert torch.allclose(probs, torch.softmax(expect.new_tensor([[4.0, 2.0, float("-inf"), float("-inf")]]), -1))
    assert filtered_probs(logits, 0.0, None, None).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # greedy: one-hot argmax


def test_extreme_but_valid_values_give_a_distribution_not_nan():
    # temperature 1e-38 would overflow logits / T to inf (softmax NaN); top_p 1e-46 rounds to 0 in float32
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 3.0, -2.0]])
    for kwargs in (dict(temperature=1e-38, top_k=None, top_p=None), dict(temperature=1.0, top_k=None, top_p=1e-46),
                   dict(temperature=1e-38, top_k=2, top_p=1e-46, min_p=1e-30)):
        probs = filtered_probs(logits, **kwargs)
        assert not probs.isnan().any() and torch.allclose(probs.sum(-1), torch.ones(2))
        assert probs[0].argmax() == 0 and probs[0, 0] == 1.0  # a tiny temperature or top_p is greedy
    assert torch.allclose(filtered_probs(logits, 1e-38, None, None)[1], torch.tensor([0.0, 0.5, 0.5, 0.0]))


def test_greedy_and_seeded_draws():
    logits = torch.tensor([[0.0, 5.0, 1.0], [7.0, 0.0, 1.0]])
    assert greedy(logits).tolist() == [1, 0]
    assert sample_next(logits, 0.0, None, None, None).tolist() == [1, 0]
    assert new_generator(0.0, 3, "cpu") is None
    a = sample_next(logits, 1.0, None, None, new_generator(1.0, 3, "cpu"))
    b = draw(torch.softmax(logits, -1), new_generator(1.0, 3, "cpu"))
    assert torch.equal(a, b)  # sample_next = filters + softmax + one draw from the generator
    # top_k=1 at any temperature is greedy
    assert sample_next(logits, 2.5, 1, None, new_generator(1.0, 0, "cpu")).tolist() == [1, 0]
    # a 1-d distribution gives a 0-d draw; a point mass is always drawn
    assert int(draw(torch.tensor([0.0, 0.0, 1.0]), new_generator(1.0, 1, "cpu"))) == 2


# ---------------------------------------------------------------------------- stops, prompts, engine rows
def test_stops_and_prompts():
    assert normalise_stops(None, None, 10) == []
    assert normalise_stops(3, [4, 5], 10) == [(3,), (4,), (5,)]
    assert normalise_stops([1, [2, 3]], 9, 10) == [(1,), (2, 3), (9,)]
    for bad in ([[]], [10], [-1], [True], ["ab"], [1.5], [[1, None]]):
        with pytest.raises(SamplingParamError, match="stop entry") as err:
            normalise_stops(bad, None, 10)
        assert err.value.param == "stop"
    with pytest.raises(SamplingParamError, match="stop_token_ids entry 12"):
        normalise_stops([1], [12], 10, name="stop_token_ids")
    stops = [(2, 3), (5,)]
    assert ends_with_stop([1, 2, 3], stops) == 2
    assert ends_with_stop([1, 5], stops) == 1
    assert ends_with_stop([3, 2], stops) == 0 and ends_with_stop([], stops) == 0
    assert normalise_prompts([torch.tensor([1, 2]), (3,)], 10) == [[1, 2], [3]]
    for bad, match in (([], "prompts is empty"), ([[1], []], "prompt 1 is empty"), ([[10]], "outside"),
                       ([[1.0]], "non-integer"), ("abc", "list of token-id lists")):
        with pytest.raises(SamplingParamError, match=match):
            normalise_prompts(bad, 10)


def test_choose_tokens_rows_are_independent():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)

    def seq(temperature, seed=None, logprobs=False, top_k=None, top_p=None, top_logprobs=0):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, logprobs=logprobs,
                                top_logprobs=top_logprobs)
        return SimpleNamespace(params=params, generator=new_generator(temperature, seed, "cpu"), prompt=[1], out=[])

    seqs = [seq(0.0, logprobs=True, top_logprobs=3), seq(0.9, seed=4, top_k=20, top_p=0.9), seq(0.0)]
    out = choose_tokens(logits, seqs)
    assert [t for t, _, _ in out][0::2] == logits.argmax(-1).tolist()[0::2]
    alone = sample_next(logits[1:2], 0.9, 20, 0.9, new_generator(0.9, 4, "cpu"))
    assert out[1][0] == int(alone[0])  # the sampled row draws as it would alone
    lp = torch.log_softmax(logits[0], -1)
    assert out[0][1] == pytest.approx(float(lp[out[0][0]]))
    order = sorted(range(50), key=lambda v: -float(lp[v]))[:3]  # the 3 most likely, by hand
    assert [t for t, _ in out[0][2]] == order and out[0][2][0][1] == pytest.approx(float(lp[order[0]]))
    assert out[1][1] is None and out[2][1] is None and out[1][2] is None


# ---------------------------------------------------------------------------- one set of checks for every caller
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    return Transformer(ModelConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, prefill_chunk=16, max_step_tokens=48)


def server_error(model, engine, field, value) -> ApiError:
    cfg = model.cfg
    ctx = ServerContext(tokenizer=None, model_names=[NAME], vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len,
                        kv_capacity=engine.kv.capacity, chat_template=default_template())
    with pytest.raises(ApiError) as err:
        parse_completion({"model": NAME, "prompt": [1, 2], field: value}, ctx)
    return err.value


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", -0.5), ("top_p", 1.5), ("top_p", 0.0), ("top_k", -3), ("top_k", 2.5),
    ("seed", 1.5),
])
def test_generate_engine_and_server_refuse_alike(model, engine, field, value):
    with pytest.raises(ValueError) as gen_err:
        generate(model, [[1, 2]], max_new_tokens=2, **{field: value})
    with pytest.raises(ParamError) as eng_err:
        engine.submit([1, 2], SamplingParams(max_tokens=2, **{field: value}))
    api = server_error(model, engine, field, value)
    message = str(gen_err.value)
    assert field in message and "\n" not in message
    assert str(eng_err.value) == message and eng_err.value.param == field
    assert (api.status, api.param, api.message) == (400, field, message)
    # the engine's error, passed through the server's mapping, is the same 400
    mapped = engine_error(eng_err.value)
    assert (mapped.status, mapped.param, mapped.message) == (400, field, message)
    if field != "seed":  # speculative decoding takes the same checks
        with pytest.raises(ValueError) as spec_err:
            speculative_generate(model, [1, 2], 2, ngram=2, **{field: value})
        assert str(spec_err.value) == message


def test_token_budget_and_stop_messages_differ_only_in_the_field_name(model, engine):
    with pytest.raises(SamplingParamError) as gen_err:
        generate(model, [[1]], max_new_tokens=-1)
    with pytest.raises(ParamError) as eng_err:
        engine.submit([1], SamplingParams(max_tokens=-1))
    api = server_error(model, engine, "max_tokens", -1)
    assert str(gen_err.value) == "max_new_tokens must be an integer >= 0, got -1"
    assert str(eng_err.value) == api.message == "max_tokens must be an integer >= 1, got -1"
    with pytest.raises(ValueError) as gen_err:
        generate(model, [[1]], stop=[[]])
    with pytest.raises(ParamError) as eng_err:
        engine.submit([1], SamplingParams(stop_token_ids=[[]]))
    assert str(gen_err.value).replace("stop entry", "stop_token_ids entry") == str(eng_err.value)
    assert eng_err.value.param == "stop_token_ids"
    V = model.cfg.vocab_size
    api = server_error(model, engine, "stop_token_ids", [V])
    with pytest.raises(ParamError) as eng_err:
        engine.submit([1], SamplingParams(stop_token_ids=[V]))
    assert (api.param, api.message) == ("stop_token_ids", str(eng_err.value))


def test_check_sampling_accepts_the_neutral_values():
    check_sampling(0, 0.0, None, None, 1.0, None, max_tokens_name="max_new_tokens", min_tokens=0)
    check_sampling(1, 2, 1, 1, 0.5, 7)
    for kwargs, field in ((dict(repetition_penalty=0.0), "repetition_penalty"),
                          (dict(repetition_penalty=float("nan")), "repetition_penalty"),
                          (dict(temperature=float("inf")), "temperature"), (dict(top_p=float("nan")), "top_p"),
                          (dict(temperature=True), "temperature"), (dict(top_k=True), "top_k")):
        with pytest.raises(SamplingParamError) as err:
            check_sampling(**{"max_tokens": 1, "temperature": 0.0, **kwargs})
        assert err.value.param == field and field in str(err.value)


# ---------------------------------------------------------------------------- min-p and the engine's penalty
def test_min_p_keeps_tokens_within_a_fraction_of_the_top_one():
    # probabilities 0.1, 0.4, 0.05, 0.3, 0.15: min_p 0.5 keeps p >= 0.2, 0.3 keeps p >= 0.12
    logits = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]]).log()
    assert kept(min_p_filter(logits, 0.5)) == [1, 3]
    assert kept(min_p_filter(logits, 0.3)) == [1, 3, 4]
    assert kept(min_p_filter(logits, 1.0)) == [1]  # the top token always stays
    assert torch.equal(min_p_filter(logits, 0.0), logits) and torch.equal(min_p_filter(logits, None), logits)
    # after temperature: at T = 2 the probabilities flatten (sqrt), so 0.5 keeps p / p_max >= 0.25 before it
    assert kept(filter_logits(logits, 2.0, None, None, 0.5)) == [0, 1, 3, 4]


def test_min_p_matches_transformers():
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(3)
    logits = torch.randn(4, 100) * 3
    for temperature, min_p in ((1.0, 0.05), (0.7, 0.2), (1.5, 0.5)):
        scaled = logits / temperature
        ref = logits_process.MinPLogitsWarper(min_p)(torch.zeros(4, 1, dtype=torch.long), scaled.clone())
        assert torch.equal(ref.isinf(), filter_logits(logits, temperature, None, None, min_p).isinf())


def test_engine_applies_repetition_penalty_and_min_p(model):
    torch.manual_seed(0)
    prompt = torch.randint(1, model.cfg.vocab_size, (200,)).tolist()  # many seen tokens: the penalty matters
    engine = Engine(model, prefill_chunk=16, max_step_tokens=48)
    plain = generate(model, [prompt], max_new_tokens=12)[0]
    for penalty in (3.0, 0.3):
        want = generate(model, [prompt], max_new_tokens=12, repetition_penalty=penalty)[0]
        got = engine.generate([prompt], SamplingParams(max_tokens=12, repetition_penalty=penalty))[0].token_ids
        assert got == want
        assert want != plain  # the penalty changed the greedy output
    # min_p: a per-token reference from the definition, drawing from the same seeded generator, on a
    # model with sharper logits (min_p then drops most of the vocabulary)
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(10.0)
    engine = Engine(sharp, prefill_chunk=16, max_step_tokens=48)
    ids, g = list(prompt), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(12):
            logits = sharp(torch.tensor([ids]))[0, -1].float() / 1.5
            probs = torch.softmax(logits, -1)
            keep = probs >= 0.3 * probs.max()
            ids.append(int(torch.multinomial(torch.softmax(logits.masked_fill(~keep, float("-inf")), -1), 1,
                                             generator=g)))
    got = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.5, seed=5, min_p=0.3))[0].token_ids
    assert got == ids[len(prompt):]
    unfiltered = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.5, seed=5))[0].token_ids
    assert unfiltered != got


@pytest.mark.parametrize("field,value", [("min_p", 1.5), ("min_p", -0.1), ("min_p", "0.1"),
                                         ("repetition_penalty", 0), ("repetition_penalty", -1.0),
                                         ("repetition_penalty", float("inf"))])
def test_engine_and_server_refuse_min_p_and_penalty_alike(model, engine, field, value):
    with pytest.raises(ParamError) as eng_err:
        engine.submit([1, 2], SamplingParams(max_tokens=2, **{field: value}))
    api = server_error(model, engine, field, value)
    assert eng_err.value.param == field and field in str(eng_err.value)
    assert (api.status, api.param, api.message) == (400, field, str(eng_err.value))
    if field == "repetition_penalty":
        with pytest.raises(ValueError) as gen_err:
            generate(model, [[1, 2]], max_new_tokens=2, repetition_penalty=value)
        assert str(gen_err.value) == str(eng_err.value)
