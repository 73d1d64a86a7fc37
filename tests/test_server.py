"""`moekit serve`: a live server on localhost driven by the official `openai` client
(completions, chat, streaming, n, stop, usage, concurrency, errors, disconnects, metrics)."""

import http.client
import inspect
import json
import re
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("tokenizers")

from moekit import ModelConfig, Transformer, save_model  # noqa: E402
from moekit.cli import COMMANDS  # noqa: E402
from moekit.generate import generate  # noqa: E402
from moekit.server import cli as serve_cli  # noqa: E402
from moekit.engine import SamplingParams  # noqa: E402
from moekit.server.chat_template import load_chat_template  # noqa: E402
from moekit.server.protocol import token_text  # noqa: E402

NAME = "tiny-test"
EOS = 0  # "<|endoftext|>" of moekit's tokenizers, which the server treats as end of sequence
TEXTS = ["def parse_args(self, args=None):", "import sys", "class HelpFormatter(object):", "    return",
         "if __name__ ==", "# comment", "self._actions", "raise ValueError("]


def tiny_model() -> Transformer:
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=1024))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # well-separated logits: exact greedy comparisons
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import argparse

    from moekit.data import train_tokenizer

    model = tiny_model()
    model.tokenizer = train_tokenizer([inspect.getsource(argparse)], 512, progress=False)
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_model(model, path)
    return path, model, model.tokenizer


def start_server(path, *flags):
    args = serve_cli.build_parser().parse_args(
        ["--checkpoint", str(path), "--port", "0", "--model-name", NAME, "--quiet",
         "--threads", str(torch.get_num_threads()), *flags])  # (the default would lower this process's)
    server, _ = serve_cli.build_server(args)
    return server.start()


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = start_server(checkpoint[0], "--prefill-chunk", "32", "--max-step-tokens", "96")
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def expected(model, ids, max_tokens, stop_text=None):
    """(text, finish_reason, completion_tokens) of greedy `generate` with the server's stopping rules."""
    out = generate(model, [ids], max_new_tokens=max_tokens, eos_token_id=EOS)[0]
    text = model.tokenizer.decode(out)
    reason = "stop" if len(out) < max_tokens else "length"
    used = len(out) + (reason == "stop")
    if stop_text and stop_text in text:
        text, reason = text[:text.index(stop_text)], "stop"
    return text, reason, used


def raw(server, method, path, body=b"", headers=None):
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def metrics(server) -> dict:
    status, headers, data = raw(server, "GET", "/metrics")
    assert status == 200
    values = {}
    for line in data.decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def wait_for(cond, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------- basics
def test_serve_is_a_registered_command():
    assert COMMANDS["serve"][0] == "moekit.server.cli"


def test_models_health_and_metrics_format(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    status, _, data = raw(server, "GET", "/health")
    assert status == 200 and json.loads(data) == {"status": "ok"}
    status, headers, data = raw(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = data.decode()
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+(inf)?$')
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    for name in ("moekit_queue_depth", "moekit_running_requests", "moekit_generation_tokens_per_second",
                 "moekit_kv_cache_usage_ratio", "moekit_kv_cache_reserved_tokens", "moekit_kv_cache_capacity_tokens"):
        assert f"# TYPE {name} gauge" in text and re.search(rf"^{name} ", text, re.M)
    assert "# TYPE moekit_generation_tokens_total counter" in text


# ---------------------------------------------------------------------------- completions and chat
def test_completion_greedy_equals_generate_with_usage(checkpoint, client):
    _, model, tok = checkpoint
    for prompt in TEXTS[:3]:
        ids = tok.encode(prompt).ids
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        text, reason, used = expected(model, ids, 12)
        assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
        assert (r.choices[0].text, r.choices[0].finish_reason, r.choices[0].index) == (text, reason, 0)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), used,
                                                                                             len(ids) + used)
    # token-id prompts are accepted too
    ids = tok.encode(TEXTS[0]).ids
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == expected(model, ids, 12)[0]


def test_chat_completion_uses_the_default_template(checkpoint, client):
    _, model, tok = checkpoint
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    text, reason, _ = expected(model, ids, 10, stop_text="<|im_end|>")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, reason)
    assert r.usage.prompt_tokens == len(ids)


def test_streaming_equals_the_non_streamed_answer(client):
    kw = dict(model=NAME, max_tokens=16, temperature=0)
    full = client.completions.create(prompt=TEXTS[0], **kw)
    chunks = list(client.completions.create(prompt=TEXTS[0], stream=True, stream_options={"include_usage": True},
                                            **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    chat_kw = dict(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=0)
    full = client.chat.completions.create(**chat_kw)
    chunks = list(client.chat.completions.create(stream=True, **chat_kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_choices_and_several_prompts(client):
    kw = dict(model=NAME, prompt=TEXTS[1], max_tokens=8, temperature=1.0, seed=5, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # choice i samples with seed + i
    assert a.usage.completion_tokens <= 3 * 8 and a.usage.prompt_tokens == b.usage.prompt_tokens
    r = client.completions.create(model=NAME, prompt=TEXTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0).choices[0].text
               for p in TEXTS[:2]]
    assert [c.text for c in r.choices] == [singles[0], singles[0], singles[1], singles[1]]
    streamed = {}
    for chunk in client.completions.create(model=NAME, prompt=TEXTS[1], max_tokens=8, temperature=1.0, seed=5, n=3,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_stop_sequences(client):
    kw = dict(model=NAME, prompt=TEXTS[2], max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop
    r = client.completions.create(stop=stop, **kw)
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(stop=["\x00never", stop], **kw)
    assert r.choices[0].text == full[:full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kw))
    assert streamed == full[:full.index(stop)]


# ---------------------------------------------------------------------------- concurrency
def test_32_concurrent_clients_get_the_sequential_greedy_outputs(checkpoint, server, client):
    _, model, tok = checkpoint
    prompts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(32)]
    max_tokens = [8 + (i % 5) * 3 for i in range(32)]  # requests leave at different steps
    sequential = [client.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0).choices[0].text
                  for p, m in zip(prompts, max_tokens)]
    results, errors = {}, []

    def worker(i):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            results[i] = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=max_tokens[i],
                                              temperature=0).choices[0].text
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(32)] == sequential
    for i in (0, 7, 31):  # and they are what generate() produces one prompt at a time
        assert sequential[i] == expected(model, tok.encode(prompts[i]).ids, max_tokens[i])[0]
    m = metrics(server)
    assert m["moekit_running_requests"] == 0 and m["moekit_kv_cache_reserved_tokens"] == 0


# ---------------------------------------------------------------------------- errors
def check_error(err, status, param=None, code=None):
    assert err.status_code == status
    body = err.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert body["param"] == param
    if code is not None:
        assert body["code"] == code
    return body


def test_error_statuses_and_the_server_keeps_serving(server, client):
    for payload in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, headers, data = raw(server, "POST", "/v1/completions", payload,
                                    {"Content-Type": "application/json"})
        body = json.loads(data)["error"]
        assert status == 400 and body["type"] == "invalid_request_error" and set(body) == {
            "message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="x")
    check_error(err.value, 404, "model", "model_not_found")
    bad_values = [("temperature", -1), ("temperature", 2.5), ("top_p", 0), ("n", 0), ("max_tokens", 0),
                  ("seed", "abc"), ("stop", [""]), ("stop", 5)]
    for name, value in bad_values:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=NAME, prompt="x", **{name: value})
        check_error(err.value, 400, name)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", extra_body={"top_k": "many"})
    check_error(err.value, 400, "top_k")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[{"role": "wizard", "content": "x"}])
    check_error(err.value, 400, "messages.[0].role")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", echo=True, stream=True)
    check_error(err.value, 400, "echo", "unsupported_parameter")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    check_error(err.value, 400, "top_logprobs")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="x", best_of=3)
    check_error(err.value, 400, "best_of", "unsupported_parameter")
    # longer than the context window (1024): the prompt alone, and prompt + max_tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=[5] * 1100, max_tokens=4)
    check_error(err.value, 400, "prompt", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=[5] * 1000, max_tokens=100)
    assert "maximum context length is 1024" in check_error(err.value, 400, "max_tokens", "context_length_exceeded")[
        "message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x " * 1100}])
    check_error(err.value, 400, "messages", "context_length_exceeded")
    status, _, data = raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(data)
    status, _, data = raw(server, "GET", "/v1/completions")
    assert status == 405 and json.loads(data)["error"]["code"] == "method_not_allowed"
    status, _, data = raw(server, "DELETE", "/v1/models")
    assert status == 405 and json.loads(data)["error"]["code"] == "method_not_allowed"
    status, _, data = raw(server, "POST", "/v1/embeddings", b'{"input": "x"}', {"Content-Type": "application/json"})
    assert status == 404 and json.loads(data)["error"]["type"] == "invalid_request_error"
    # still serving
    assert client.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0).choices[0].text is not None
    assert metrics(server)['moekit_http_requests_total{path="/v1/completions",status="400"}'] >= 10


def test_kv_budget_rejection_and_queue_full(checkpoint):
    srv = start_server(checkpoint[0], "--kv-budget", "64", "--max-queue", "1")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        # a request that could never fit the KV budget (64 tokens) even alone: 400
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model=NAME, prompt="import sys", max_tokens=100)
        check_error(err.value, 400, "max_tokens", "kv_budget_exceeded")
        # chat without max_tokens gets what fits (the context window, capped by the KV budget)
        r = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                      temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason in ("stop", "length")
        # a full queue: 429 (the paused engine admits nothing, so the first request stays queued)
        srv.engine.pause()
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", c.completions.create(
            model=NAME, prompt="import sys", max_tokens=4, temperature=0)))
        t.start()
        assert wait_for(lambda: srv.engine.metrics()["queue_depth"] == 1)
        with pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model=NAME, prompt="import sys", max_tokens=4)
        check_error(err.value, 429, None, "queue_full")
        assert err.value.response.headers["retry-after"] == "1"
        srv.engine.resume()
        t.join(60)
        assert first["r"].choices[0].finish_reason in ("stop", "length")
        assert metrics(srv)["moekit_requests_rejected_total"] == 1
        assert c.completions.create(model=NAME, prompt="x", max_tokens=3).choices
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------- disconnects
def test_client_disconnect_mid_stream_frees_its_slot(server, client):
    before = metrics(server)['moekit_requests_finished_total{reason="cancelled"}']
    stream = client.completions.create(model=NAME, prompt=TEXTS[3], max_tokens=1000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    got = [next(iter(stream)) for _ in range(3)]
    assert all(g.choices for g in got)
    assert server.engine.metrics()["running"] == 1
    stream.close()  # the client goes away mid-stream
    assert wait_for(lambda: metrics(server)['moekit_requests_finished_total{reason="cancelled"}'] == before + 1)
    m = metrics(server)
    assert m["moekit_running_requests"] == 0 and m["moekit_kv_cache_reserved_tokens"] == 0
    # a client waiting for a non-streamed answer that hangs up is noticed too
    host, port = server.httpd.server_address[:2]
    body = json.dumps({"model": NAME, "prompt": TEXTS[4], "max_tokens": 1000, "temperature": 0,
                       "ignore_eos": True}).encode()
    sock = socket.create_connection((host, port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert wait_for(lambda: server.engine.metrics()["running"] == 1)
    sock.close()
    assert wait_for(lambda: metrics(server)['moekit_requests_finished_total{reason="cancelled"}'] == before + 2)
    assert wait_for(lambda: metrics(server)["moekit_kv_cache_reserved_tokens"] == 0)
    # and the server keeps serving
    r = client.completions.create(model=NAME, prompt=TEXTS[0], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------------------- templates and cli
def test_chat_template_from_the_tokenizer_config(tmp_path):
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ bos_token }}ASSISTANT:{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    t = load_chat_template(tmp_path)
    assert t.render([{"role": "user", "content": "hi"}]) == "[user] hi\n<s>ASSISTANT:"
    assert t.stop == []
    assert load_chat_template(tmp_path, "default").stop == ["<|im_end|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% raise %}"}))
    with pytest.raises(ValueError, match="does not parse"):
        load_chat_template(tmp_path)


def test_cli_errors(tmp_path, capsys):
    from moekit.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--no-malloc-tune"]) == 2
    assert "does not exist" in capsys.readouterr().err
    model = tiny_model()
    save_model(model, tmp_path / "no_tok")
    assert main(["serve", str(tmp_path / "no_tok"), "--no-malloc-tune"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_block_size_and_prefix_caching_flags_reach_the_engine(checkpoint):
    ids = list(range(5, 5 + 40))  # 40 prompt tokens: two full blocks of 16 (one hit), five of 8
    for flags, enabled in ((["--block-size", "8", "--kv-budget", "512"], 1.0), (["--no-prefix-caching"], 0.0)):
        srv = start_server(checkpoint[0], "--prefill-chunk", "8", *flags)
        try:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            first = c.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0)
            again = c.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0)
            assert again.choices[0].text == first.choices[0].text
            m = metrics(srv)
            assert m["moekit_prefix_cache_enabled"] == enabled
            if enabled:  # 512 tokens in blocks of 8; the second request found the first one's 4 full blocks
                assert m["moekit_kv_cache_blocks_total"] == 512 // 8
                assert m["moekit_prefix_cache_hit_tokens_total"] == 32
            else:
                assert m["moekit_prefix_cache_hit_tokens_total"] == 0
        finally:
            srv.shutdown()


def test_serve_with_quantized_weights(checkpoint):
    pytest.importorskip("moekit.quantize")
    srv = start_server(checkpoint[0], "--quantize", "int8")
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model=NAME, prompt=TEXTS[0], max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        assert type(srv.engine.model.layers[0].attn.q_proj).__name__ == "QuantizedLinear"
    finally:
        srv.shutdown()
    with pytest.raises(SystemExit):  # argparse: not one of the --quantize choices
        start_server(checkpoint[0], "--quantize", "int3-nonsense")


def test_repetition_penalty_and_min_p_are_applied(checkpoint, client):
    _, model, tok = checkpoint
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.cfg.vocab_size, (200,), generator=g).tolist()  # many seen tokens
    for penalty in (3.0, 0.3):  # greedy with HF's repetition penalty = moekit.generate with the same penalty
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"repetition_penalty": penalty})
        want = generate(model, [prompt], max_new_tokens=8, repetition_penalty=penalty, eos_token_id=EOS)[0]
        assert r.choices[0].text == tok.decode(want)
        assert want != generate(model, [prompt], max_new_tokens=8, eos_token_id=EOS)[0]  # it mattered
    # min_p = 1 keeps only the most likely token: sampling at temperature 2 becomes greedy
    greedy_text = expected(model, prompt, 24)[0]
    sampled = []
    for seed in range(4):
        kw = dict(model=NAME, prompt=prompt, max_tokens=24, temperature=2.0, seed=seed)
        assert client.completions.create(**kw, extra_body={"min_p": 1.0}).choices[0].text == greedy_text
        sampled.append(client.completions.create(**kw).choices[0].text)
    assert any(text != greedy_text for text in sampled)
    for name, value in (("min_p", 1.5), ("min_p", -0.5), ("repetition_penalty", 0), ("repetition_penalty", -2)):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                           extra_body={name: value})
        assert name in check_error(err.value, 400, name)["message"]


def test_a_vanishing_temperature_or_nucleus_is_served_and_health_stays_ok(checkpoint, server, client):
    path, model, tok = checkpoint
    ids = tok.encode("def parse_args(").ids
    greedy = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0).choices[0].text
    for kw in (dict(temperature=1e-38), dict(temperature=1.0, top_p=1e-46)):
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=8, seed=1, **kw)
        assert r.choices[0].text == greedy
    assert raw(server, "GET", "/health")[0] == 200


def test_serve_exits_when_the_engine_thread_dies(checkpoint):
    srv = serve_cli.build_server(serve_cli.build_parser().parse_args(
        [str(checkpoint[0]), "--port", "0", "--quiet", "--threads", str(torch.get_num_threads())]))[0]

    def broken_step():  # fault injection: the engine loop itself fails (not one request)
        raise SystemError("simulated engine failure")

    srv.engine.step = broken_step
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("error", srv.serve_forever()))
    runner.start()
    srv.engine.submit([1, 2, 3], SamplingParams(max_tokens=2))  # wake the loop
    runner.join(timeout=30)
    try:
        assert not runner.is_alive() and "simulated engine failure" in result["error"]
    finally:
        srv.shutdown()


def raw_bytes(server, data: bytes) -> bytes:
    """Send `data` as is on a fresh socket; the whole answer (the server closes after an error)."""
    with socket.create_connection(server.httpd.server_address[:2], timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def answer(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_malformed_requests_get_openai_style_400s_and_the_server_keeps_serving(server):
    post = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
    for headers, body, words in [
        ("Content-Length: -1\r\n", b"", "Content-Length"),
        ("Content-Length: 2\r\nContent-Length: 3\r\n", b"{}", "conflicting"),
        (None, b"[" * 100000 + b"]" * 100000, "nests too deeply"),
        (None, b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "parse the JSON"),
        (None, json.dumps({"model": NAME, "prompt": "x", "seed": 2**70}).encode(), "64-bit"),
        (None, b'{"model": "' + NAME.encode() + b'", "prompt": "a\\ud800b", "max_tokens": 2}', "not valid Unicode"),
        (None, json.dumps({"model": NAME, "prompt": "x", "stop": ["s%d" % i for i in range(65)]}).encode(), "limit"),
    ]:
        headers = headers if headers is not None else f"Content-Length: {len(body)}\r\n"
        status, err = answer(raw_bytes(server, (post + headers + "\r\n").encode() + body))
        assert status == 400 and words in err["error"]["message"], (status, err)
    for method in ("HEAD", "OPTIONS"):
        status, headers, data = raw(server, method, "/v1/completions")
        assert status == 405
    status, err = answer(raw_bytes(server, b"FOO /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 501 and err["error"]["type"] == "invalid_request_error"
    status, err = answer(raw_bytes(server, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert status == 414 and "error" in err
    assert raw(server, "GET", "/health")[0] == 200


def dense_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(checkpoint, client):
    # lm-evaluation-harness's local-completions log-likelihood request: token ids, echo, logprobs=1, max_tokens=0
    path, model, tok = checkpoint
    ids = tok.encode("def parse_args(argv=None):\n    return argv").ids
    r = client.completions.create(model=NAME, prompt=ids, echo=True, logprobs=1, max_tokens=0, temperature=0)
    lp = r.choices[0].logprobs
    ref = dense_logprobs(model, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    assert "".join(lp.tokens) == r.choices[0].text == tok.decode(ids)  # (an ASCII prompt: no partial tokens)
    assert lp.text_offset == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    for t in range(1, len(ids)):  # the top-1 alternative is the argmax of the in-process distribution
        (text, value), = lp.top_logprobs[t].items()
        assert text == token_text(tok, int(ref[t - 1].argmax()))
        assert value == pytest.approx(float(ref[t - 1].max()), abs=1e-5)


def test_logprobs_of_generated_tokens_with_top_alternatives(checkpoint, client):
    path, model, tok = checkpoint
    ids = tok.encode("import sys").ids
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=5, logprobs=3, temperature=0)
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 5
    gen = generate(model, [ids], max_new_tokens=5)[0]
    ref = dense_logprobs(model, ids + gen)
    for k, t in enumerate(gen):
        assert lp.token_logprobs[k] == pytest.approx(float(ref[len(ids) - 1 + k, t]), abs=1e-4)
        assert len(lp.top_logprobs[k]) == 3 and max(lp.top_logprobs[k].values()) == pytest.approx(lp.token_logprobs[k])
    echo = client.completions.create(model=NAME, prompt=ids, max_tokens=5, logprobs=0, temperature=0, echo=True)
    assert echo.choices[0].text == tok.decode(ids) + choice.text
    assert echo.choices[0].logprobs.token_logprobs[len(ids):] == pytest.approx(lp.token_logprobs)
    for kw, param in ((dict(logprobs=21), "logprobs"), (dict(max_tokens=0), "max_tokens")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=NAME, prompt=ids, **{"max_tokens": 2, **kw})
        assert err.value.body["param"] == param


def test_streamed_logprobs_equal_the_non_streamed_ones(client):
    ids = [5, 17, 29, 3]
    whole = client.completions.create(model=NAME, prompt=ids, max_tokens=6, logprobs=2, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=ids, max_tokens=6, logprobs=2, temperature=0,
                                            stream=True))
    got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        lp = ch.choices[0].logprobs if ch.choices else None
        for key in got:
            got[key] += getattr(lp, key) if lp is not None else []
    ref = whole.choices[0].logprobs
    assert got == {key: getattr(ref, key) for key in got}


def test_chat_logprobs_and_top_logprobs_in_openai_format(checkpoint, server, client):
    path, model, tok = checkpoint
    messages = [{"role": "user", "content": "import os"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    # the reference: the in-process distribution of the same prompt ids (the template is the server's)
    status, _, data = raw(server, "POST", "/tokenize", json.dumps({"model": NAME, "messages": messages}).encode())
    prompt = json.loads(data)["tokens"]
    gen = generate(model, [prompt], max_new_tokens=4)[0]
    ref = dense_logprobs(model, prompt + gen)
    for k, (entry, t) in enumerate(zip(content, gen)):
        assert entry.token == token_text(tok, t)
        assert entry.logprob == pytest.approx(float(ref[len(prompt) - 1 + k, t]), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == tok.decode([t])
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    streamed = [e for ch in client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0,
                                                            logprobs=True, stream=True)
                if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.top_logprobs) for e in streamed] == [(e.token, e.logprob, []) for e in content]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_a_partial_utf8_token_is_written_as_its_bytes(checkpoint):
    tok = checkpoint[2]
    partial = next(i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i]))
    text = token_text(tok, partial)
    first = tok.encode("def").ids[0]
    assert text.startswith("bytes:") and token_text(tok, first) == tok.decode([first])
    eot = tok.token_to_id("<|endoftext|>")  # a special token is named, not the empty string decode() gives
    assert token_text(tok, eot) == "<|endoftext|>" and tok.decode([eot]) == ""
    raw_bytes_ = bytes(int(h, 16) for h in text[len("bytes:"):].split("\\x")[1:])
    assert tok.decode([partial]) == raw_bytes_.decode("utf-8", errors="replace")


def test_tokenize_detokenize_and_tokenizer_info(checkpoint, server):
    tok = checkpoint[2]
    text = "def  main():\n\treturn 0"
    status, _, data = raw(server, "POST", "/tokenize", json.dumps({"model": NAME, "prompt": text}).encode(),
                          {"Content-Type": "application/json"})
    body = json.loads(data)
    assert status == 200 and body["tokens"] == tok.encode(text).ids and body["count"] == len(body["tokens"])
    status, _, data = raw(server, "POST", "/detokenize", json.dumps({"model": NAME, "tokens": body["tokens"]}).encode())
    assert status == 200 and json.loads(data)["prompt"] == text
    messages = [{"role": "user", "content": "hi"}]
    status, _, data = raw(server, "POST", "/tokenize", json.dumps({"model": NAME, "messages": messages}).encode())
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert status == 200 and json.loads(data)["tokens"] == tok.encode(rendered, add_special_tokens=False).ids
    status, _, data = raw(server, "GET", "/tokenizer_info")
    assert status == 200 and json.loads(data)["vocab_size"] == tok.get_vocab_size()
    status, _, data = raw(server, "POST", "/detokenize", json.dumps({"model": NAME, "tokens": [10**9]}).encode())
    assert status == 400 and json.loads(data)["error"]["param"] == "tokens"


def test_api_key_guards_everything_but_health_and_metrics(checkpoint):
    srv = start_server(checkpoint[0], "--api-key", "s3cret")
    try:
        assert raw(srv, "GET", "/health")[0] == 200 and raw(srv, "GET", "/metrics")[0] == 200
        status, _, data = raw(srv, "GET", "/v1/models")
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=NAME, prompt="x", max_tokens=2)
        right = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0).choices[0].text is not None
    finally:
        srv.shutdown()


def penalised_greedy(model, ids, n, presence=0.0, frequency=0.0, bias=None):
    """A per-token reference loop: the full forward each step, OpenAI's penalties over the generated tokens."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits_V = model(torch.tensor([ids + out]))[0, -1].float()
        for t in set(out):
            logits_V[t] -= presence + frequency * out.count(t)
        for t, b in (bias or {}).items():
            logits_V[t] += b
        out.append(int(logits_V.argmax()))
    return out


def test_presence_frequency_penalties_logit_bias_and_min_tokens(checkpoint, client):
    path, model, tok = checkpoint
    ids = tok.encode("def main(").ids
    plain = generate(model, [ids], max_new_tokens=10)[0]
    for kw in (dict(presence_penalty=2.0), dict(frequency_penalty=1.5), dict(presence_penalty=-1.0, frequency_penalty=0.7)):
        r = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0, **kw)
        ref = penalised_greedy(model, ids, 10, kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0))
        assert tok.decode(ref) == r.choices[0].text
    # (that the penalties change this model's output is checked in test_engine.py on an unscaled model)
    forced = next(t for t in range(5, 400) if t not in plain)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0, logit_bias={str(forced): 100})
    assert r.choices[0].text == tok.decode(penalised_greedy(model, ids, 4, bias={forced: 100.0}))
    stop_at = plain[1]  # greedy stops at its 2nd token, unless min_tokens holds it back
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": [stop_at]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 2
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": [stop_at], "min_tokens": 4})
    assert r.usage.completion_tokens >= 4
    for kw, param in ((dict(presence_penalty=3), "presence_penalty"), (dict(logit_bias={"x": 1}), "logit_bias"),
                      (dict(logit_bias={"5": 101}), "logit_bias"), (dict(extra_body={"min_tokens": -1}), "min_tokens")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=NAME, prompt=ids, max_tokens=2, **kw)
        assert err.value.body["param"] == param
