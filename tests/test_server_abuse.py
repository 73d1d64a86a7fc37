"""`moekit serve` under abuse: slow sockets, too many connections, oversized and many-prompt requests,
half-closed clients, SIGTERM. Each test ends with the server still answering /health (or, for
SIGTERM, with the process gone cleanly)."""

import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("tokenizers")

from moekit import ModelConfig, Transformer, save_model  # noqa: E402
from moekit.server import cli as serve_cli  # noqa: E402

NAME = "tiny-test"
TIMEOUT_S = 3  # --request-timeout of the shared server


def save_tiny(path, max_seq_len: int = 1024):
    import argparse

    from moekit.data import train_tokenizer

    torch.manual_seed(1234)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=max_seq_len)).eval()
    model.tokenizer = train_tokenizer([inspect.getsource(argparse)], 512, progress=False)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("abuse") / "ckpt")


def start_server(path, *flags):
    args = serve_cli.build_parser().parse_args(
        [str(path), "--port", "0", "--model-name", NAME, "--quiet", "--threads", str(torch.get_num_threads()), *flags])
    return serve_cli.build_server(args)[0].start()


@pytest.fixture(scope="module")
def server(checkpoint):
    srv = start_server(checkpoint, "--request-timeout", str(TIMEOUT_S), "--max-prompts-per-request", "8")
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def address(server):
    return server.httpd.server_address[:2]


def read_all(sock, timeout=30.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def answer(reply: bytes):
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def health(server) -> int:
    with socket.create_connection(address(server), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return answer(read_all(sock))[0]


def wait_for(cond, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def post(path: str, body: dict, version: str = "HTTP/1.1") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} {version}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
            "\r\n\r\n").encode() + data


# ---------------------------------------------------------------------------- bounded work per connection
def test_slow_sockets_do_not_stop_normal_requests_and_are_dropped(server, client):
    request = post("/v1/completions", {"model": NAME, "prompt": "import sys", "max_tokens": 2})
    slow = [socket.create_connection(address(server)) for _ in range(50)]
    head, _, body = request.partition(b"\r\n\r\n")
    slow_body = socket.create_connection(address(server))  # the headers at once, then the body a byte a second
    slow_body.sendall(head + b"\r\n\r\n")
    stop = threading.Event()

    def trickle():
        for i in range(len(request)):
            for sock in slow:
                try:
                    sock.send(request[i:i + 1])
                except OSError:
                    pass
            try:
                slow_body.send(body[i:i + 1])
            except OSError:
                pass
            if stop.wait(1.0):
                return

    started = time.time()
    threading.Thread(target=trickle, daemon=True).start()
    try:
        assert wait_for(lambda: server.httpd.connections >= 51, timeout=10)
        for _ in range(3):  # answered promptly while the slow ones hold their threads
            t0 = time.time()
            r = client.completions.create(model=NAME, prompt="import sys", max_tokens=4, temperature=0)
            assert r.choices[0].finish_reason in ("stop", "length") and time.time() - t0 < 5
        # the slow ones are dropped once the request timeout has passed: the slow body with a 408
        status, err = answer(read_all(slow_body))
        assert status == 408 and json.loads(err)["error"]["code"] == "request_timeout"
        for sock in slow:
            assert read_all(sock) == b""  # closed by the server, no request ever completed
        assert time.time() - started < TIMEOUT_S + 3
        assert wait_for(lambda: server.httpd.connections == 0, timeout=5)  # their threads are free
    finally:
        stop.set()
        for sock in slow + [slow_body]:
            sock.close()
    assert health(server) == 200


def test_connections_beyond_the_cap_get_503_json(checkpoint):
    srv = start_server(checkpoint, "--max-connections", "2")
    try:
        idle = [socket.create_connection(address(srv)) for _ in range(2)]
        assert wait_for(lambda: srv.httpd.connections == 2)
        with socket.create_connection(address(srv)) as sock:  # answered before it sends anything
            status, body = answer(read_all(sock, timeout=10))
        assert status == 503 and json.loads(body)["error"]["type"] == "server_error"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model=NAME, prompt="import sys", max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "too_many_connections"
        assert err.value.response.headers["retry-after"] == "1"
        assert health(srv) == 503
        for sock in idle:
            sock.close()
        assert wait_for(lambda: srv.httpd.connections == 0)
        assert health(srv) == 200
        assert c.completions.create(model=NAME, prompt="import sys", max_tokens=2).choices
    finally:
        srv.shutdown()


def test_a_body_over_the_limit_gets_413_json(server):
    from moekit.server.app import MAX_BODY_BYTES

    with socket.create_connection(address(server), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))
        status, body = answer(read_all(sock))
    assert status == 413 and str(MAX_BODY_BYTES) in json.loads(body)["error"]["message"]
    assert health(server) == 200


# ---------------------------------------------------------------------------- prompts per request
def test_one_request_cannot_ask_for_more_than_the_prompt_limit(server, client):
    for kw in (dict(prompt=["import sys"] * 9), dict(prompt=["import sys"] * 3, n=3),
               dict(prompt=[[1, 2, 3]] * 100000)):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=NAME, max_tokens=2, **kw)
        assert err.value.body["param"] == "prompt" and "limit per request is 8" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # chat: one prompt, n of them
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=9, max_tokens=2)
    assert err.value.body["param"] == "messages"
    r = client.completions.create(model=NAME, prompt=["import sys", "class"] * 2, n=2, max_tokens=2)
    assert len(r.choices) == 8  # at the limit: served
    assert health(server) == 200


# ---------------------------------------------------------------------------- half-closed clients
@pytest.mark.parametrize("stream", [False, True])
def test_a_half_closed_client_still_gets_its_answer(server, client, stream):
    body = {"model": NAME, "prompt": "def parse_args(", "max_tokens": 12, "temperature": 0}
    want = client.completions.create(**body, extra_body={"ignore_eos": True}).choices[0].text
    body["ignore_eos"] = True
    server.engine.pause()  # the server looks at the socket (poll_s) while the request waits
    try:
        sock = socket.create_connection(address(server))
        sock.sendall(post("/v1/completions", {**body, "stream": stream}, "HTTP/1.0"))
        sock.shutdown(socket.SHUT_WR)  # an HTTP/1.0-style client: done sending, still reading
        assert wait_for(lambda: server.engine.metrics()["queue_depth"] == 1)
        time.sleep(4 * server.poll_s)
    finally:
        server.engine.resume()
    status, reply = answer(read_all(sock))
    sock.close()
    assert status == 200
    if stream:
        events = re.findall(rb"^data: (.*)$", reply, flags=re.M)
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    else:
        assert json.loads(reply)["choices"][0]["text"] == want
    assert health(server) == 200


# ---------------------------------------------------------------------------- SIGTERM
def sse_reader(port: int, body: dict, log: list) -> threading.Thread:
    """Stream `body` on its own socket, appending each SSE data payload (bytes) to `log`."""
    def run():
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(post("/v1/completions", {**body, "stream": True}))
            buf = b""
            try:
                while chunk := sock.recv(65536):
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        log.extend(m for m in re.findall(rb"^data: (.*)$", event, flags=re.M))
            except OSError:
                log.append(b"<reset>")
            log.append(b"<closed>")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def serve_process(checkpoint, *flags, name=NAME):
    """The real `moekit serve` in a subprocess on a free port: (process, port)."""
    proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "serve", str(checkpoint), "--port", "0",
                             "--model-name", name, "--quiet", "--no-malloc-tune", "--threads", "1", *flags],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stderr:
        if m := re.search(r"on http://127\.0\.0\.1:(\d+)", line):
            return proc, int(m.group(1))
    proc.kill()
    raise AssertionError("the server did not start")


def test_sigterm_finishes_running_streams_refuses_new_connections_and_exits_0(tmp_path):
    grace = 5.0
    checkpoint = save_tiny(tmp_path / "ckpt", max_seq_len=16384)  # room for a stream far longer than the grace
    proc, port = serve_process(checkpoint, "--kv-budget", "20000", "--shutdown-grace", str(grace))
    try:
        base = {"model": NAME, "prompt": "import sys", "temperature": 0, "ignore_eos": True}
        short, long_ = [], []
        readers = [sse_reader(port, {**base, "max_tokens": 150}, short),  # finishes within the grace period
                   sse_reader(port, {**base, "max_tokens": 16000}, long_)]  # outlasts it
        assert wait_for(lambda: len(short) >= 2 and len(long_) >= 2)
        proc.send_signal(signal.SIGTERM)
        sent = time.time()
        assert b"[DONE]" not in short  # still running

        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
        assert wait_for(refused, timeout=3)  # no new connections
        assert proc.wait(timeout=grace + 10) == 0
        assert time.time() - sent < grace + 3
        for t in readers:
            t.join(10)
        # the short stream finished: all its tokens, finish_reason, [DONE]
        assert short[-2:] == [b"[DONE]", b"<closed>"], short[-3:]
        chunks = [json.loads(e) for e in short[:-2]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) >= 2
        # the long one was ended at the grace period: its tokens, an error event, [DONE]
        assert long_[-2:] == [b"[DONE]", b"<closed>"], long_[-3:]
        assert b"error" in long_[-3], long_[-5:]
        error = json.loads(long_[-3])["error"]
        assert error["code"] == "engine_stopped" and "shut down" in error["message"]
        assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in long_[:-3])
        log = proc.stderr.read()
        assert "grace period over" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
