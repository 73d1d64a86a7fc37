"""The HTTP server: OpenAI-compatible endpoints over the engine, on the standard library.

    server = OpenAIServer(engine, tokenizer, "my-model").bind("127.0.0.1", 8000).start()
    ... server.url ...
    server.shutdown()

Endpoints: GET /health, GET /metrics (Prometheus text), GET /v1/models[/ID],
POST /v1/completions, POST /v1/chat/completions (fields: protocol.py). One thread per
connection parses, tokenizes and waits; the model runs on the engine's thread. Streaming:
one SSE `data: {json}` chunk per text delta of a choice, one with its finish_reason, a usage
chunk if stream_options.include_usage, then `data: [DONE]`, and the connection closes.
Errors: OpenAI's error JSON; engine errors map as `engine_error` (statuses: engine/errors.py),
plus 404 unknown path, 405 wrong method, 413 body too large, 500 the engine failed on this
request. A client that disconnects is noticed within `poll_s` seconds or at the next write;
its requests are cancelled, which frees their KV reservations.

Bounded work: reading a request (line, headers, body) must end within `request_timeout` seconds
however slowly the bytes come (else the connection is dropped, 408 for a late body); at most
`max_connections` connections are served at once, the next ones get 503 from the accepting thread;
bodies over MAX_BODY_BYTES get 413; `drain(grace_s)` is the graceful shutdown (SIGTERM in cli.py).
"""

from __future__ import annotations

import collections
import hmac
import io
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional
from urllib.parse import urlsplit

from ..engine import (Completion, ContextLengthError, EngineStoppedError, KVBudgetError, ParamError,
                      QueueFullError)
from ..sampling import SamplingParamError
from . import metrics as prom
from .chat_template import ChatTemplate, default_template
from .protocol import (ApiError, GenerationRequest, chat_logprobs_body, chunk_body, completion_body, detokenize_body,
                       logprobs_body, models_body, new_id, now, parse_chat, parse_completion, tokenize_body, tokenizer_info, usage)

MAX_BODY_BYTES = 16 * 2**20
_DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
_PATHS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize",
          "/detokenize", "/tokenizer_info")
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key


@dataclass
class ServerContext:
    """What request validation needs to know about the served model."""

    tokenizer: object
    model_names: List[str]
    vocab_size: int
    max_seq_len: int
    kv_capacity: int
    chat_template: ChatTemplate
    max_prompts: int = 64  # prompts x n per request
    return_routed_experts: bool = False  # the engine records routed experts (--enable-return-routed-experts)


def engine_error(err: Exception) -> ApiError:
    """Map an engine exception to the HTTP error it stands for."""
    if isinstance(err, (ParamError, SamplingParamError)):  # the engine's, or moekit.sampling's checks directly
        code = {ContextLengthError: "context_length_exceeded", KVBudgetError: "kv_budget_exceeded"}.get(type(err))
        return ApiError(400, str(err), param=err.param, code=code or "invalid_value")
    if isinstance(err, QueueFullError):
        return ApiError(429, str(err), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(err, EngineStoppedError):
        return ApiError(503, str(err), type="server_error", code="engine_stopped")
    raise err


class OpenAIServer:
    def __init__(self, engine, tokenizer, model_name: str, chat_template: Optional[ChatTemplate] = None,
                 log_requests: bool = False, poll_s: float = 0.2, api_key: Optional[str] = None,
                 request_timeout: float = 30.0, max_connections: int = 256, max_prompts: int = 64):
        if tokenizer is None:
            raise ValueError("the server needs a tokenizer (tokenizer.json in the checkpoint) to turn text into tokens")
        for name, v in (("--request-timeout", request_timeout), ("--max-connections", max_connections),
                        ("--max-prompts-per-request", max_prompts)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        cfg = engine.model.cfg
        self.engine, self.log_requests, self.poll_s, self.api_key = engine, log_requests, poll_s, api_key
        self.request_timeout, self.max_connections = float(request_timeout), int(max_connections)
        self.ctx = ServerContext(tokenizer, [model_name], cfg.vocab_size, cfg.max_seq_len, engine.kv.capacity,
                                 chat_template or default_template(), int(max_prompts),
                                 engine.return_routed_experts)
        self.created = now()
        self.http_counts = collections.Counter()
        self._count_lock = threading.Lock()
        self.httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.stopping = threading.Event()
        self.engine_error: Optional[str] = None  # set when the engine thread died while serving
        self.draining = threading.Event()  # set by drain(): new requests get 503
        self.in_flight = 0  # requests being answered
        self._idle = threading.Condition()

    def count(self, path: str, status: int) -> None:
        if path.startswith("/v1/models/"):
            path = "/v1/models"
        with self._count_lock:
            self.http_counts[(path if path in _PATHS else "other", status)] += 1

    def bind(self, host: str = "127.0.0.1", port: int = 8000) -> "OpenAIServer":
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self
        return self

    def request_began(self) -> None:
        with self._idle:
            self.in_flight += 1

    def request_ended(self) -> None:
        with self._idle:
            self.in_flight -= 1
            self._idle.notify_all()

    def drain(self, grace_s: float) -> bool:
        """Graceful stop, once the accept loop has stopped (`httpd.shutdown()`): close the listening
        socket (new connections are refused), let running requests finish for up to `grace_s` seconds,
        then stop the engine: streams still running end with an error event and [DONE], waiting
        non-streamed requests get 503. True if all finished within the grace period."""
        self.draining.set()
        self.httpd.server_close()
        with self._idle:
            finished = self._idle.wait_for(lambda: self.in_flight == 0, timeout=grace_s)
        if not finished:
            self.engine.stop()
            with self._idle:  # the handlers write their last words
                self._idle.wait_for(lambda: self.in_flight == 0, timeout=5.0)
        return finished

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "OpenAIServer":
        """Start the engine thread and serve on a background thread (returns self)."""
        self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="moekit-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> Optional[str]:
        """Serve until `shutdown()`, or until the engine thread dies: then stop serving and return its
        error, so `moekit serve` exits non-zero and a supervisor restarts it (a dead engine behind a
        live socket would answer 503 forever)."""
        self.engine.start()
        threading.Thread(target=self._watch_engine, name="moekit-watchdog", daemon=True).start()
        self.httpd.serve_forever()
        return self.engine_error

    def _watch_engine(self) -> None:
        while self.engine.metrics()["thread_alive"] or self.engine.thread_error is None:
            if self.stopping.wait(self.poll_s):
                return
        self.engine_error = self.engine.thread_error
        self.httpd.shutdown()

    def shutdown(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.engine.stop()


class _HTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `app.max_connections` of them."""

    daemon_threads = True
    request_queue_size = 256  # many clients connect at once; the default backlog (5) drops SYNs

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.connections = 0
        self.connections_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self.connections_lock:
            full = self.connections >= self.app.max_connections
            self.connections += not full
        if full:
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connection_closed()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connection_closed()

    def connection_closed(self) -> None:
        with self.connections_lock:
            self.connections -= 1

    def refuse(self, sock) -> None:
        """503 for a connection beyond the cap, written by the accepting thread (no thread of its own)."""
        err = ApiError(503, f"the server is serving its limit of {self.app.max_connections} connections; "
                            "retry later", type="server_error", code="too_many_connections")
        body = json.dumps(err.body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                f"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.settimeout(0.5)
            if select.select([sock], [], [], 0.01)[0]:  # the request, if it came with the connection:
                sock.recv(65536)  # closing with unread bytes would reset the connection, losing the answer
            sock.sendall(head + body)
        except OSError:  # the client already went away: nobody to answer, the socket is closed below
            pass
        self.app.count("other", 503)
        self.shutdown_request(sock)


class _DeadlineReader(socket.SocketIO):
    """A connection's read side that raises TimeoutError once `deadline` (time.monotonic()) has passed,
    however the bytes trickle in: a client sending a byte a second holds its thread for at most
    the request timeout."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock, "rb")
        self.sock, self.deadline = sock, None

    def readinto(self, b):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client did not send its request in time")
            self.sock.settimeout(left)
        return super().readinto(b)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "moekit-serve"

    @property
    def app(self) -> OpenAIServer:
        return self.server.app

    @property
    def timeout(self) -> float:  # each socket operation's limit (StreamRequestHandler.setup)
        return self.app.request_timeout

    def setup(self):
        super().setup()
        self.rfile.close()
        self.reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        """One request; reading it (line, headers, body) must end within the request timeout."""
        self.reader.deadline = time.monotonic() + self.app.request_timeout
        super().handle_one_request()

    def _request_read(self) -> None:
        """The request is in: writes and later reads get the per-operation timeout only."""
        if self.reader.deadline is not None:
            self.reader.deadline = None
            self.connection.settimeout(self.timeout)

    def log_message(self, format, *args):  # noqa: A002 -- the base class's name
        if self.app.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes, content_type: str, headers: Optional[dict] = None) -> None:
        self._request_read()
        if not self._head_sent:  # (else `_probe` sent a 200 head: only the body is left to write)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
        self.wfile.write(body)
        self.app.count(urlsplit(self.path).path, status)

    def _send_json(self, status: int, obj, headers: Optional[dict] = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _client_gone(self) -> bool:
        """True once the client has certainly gone (its socket reports an error). An end of stream alone
        does not tell: a client that half-closed its socket after sending (shutdown(SHUT_WR), as
        HTTP/1.0-style clients do) still reads the answer. So at the first end of stream, `_probe`
        writes: a client that closed answers that with a reset, which the next check sees (POLLHUP)."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            events = poller.poll(0)
            mask = events[0][1] if events else 0
            if mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return True
            if mask & select.POLLIN and self.connection.recv(1, socket.MSG_PEEK) == b"" and not self._probed:
                self._probed = True
                self._probe()
        except (OSError, ValueError):
            return True
        return False

    def _probe(self) -> None:
        """Write something harmless: an SSE comment in a stream; else the head of a 200 reply whose body
        ends with the connection (a failure after this is then written as the body of that 200)."""
        self.close_connection = True
        if self._head_sent:
            self.wfile.write(b": waiting\n\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        self._head_sent = True

    def _authorised(self) -> None:
        """With an API key, every route but /health and /metrics needs `Authorization: Bearer KEY`."""
        key = self.app.api_key
        if key is None or urlsplit(self.path).path in OPEN_PATHS:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")

    def _dispatch(self, fn) -> None:
        self._body_read = self._head_sent = self._probed = False
        if self.command != "POST":
            self._request_read()
        self.app.request_began()
        try:
            if self.app.draining.is_set():
                self.close_connection = True
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            self._authorised()
            fn()
        except ApiError as err:
            if self.command not in ("GET", "HEAD") and not self._body_read:
                self.close_connection = True  # an unread body would be taken for the next request
            self._send_json(err.status, err.body(), err.headers)
        except _DISCONNECTED:
            self.close_connection = True
        except Exception as err:  # a bug: answer 500 and keep serving
            traceback.print_exc()
            msg = f"internal error: {type(err).__name__}: {err}"
            self._send_json(500, ApiError(500, msg, type="server_error").body())
        finally:
            self.app.request_ended()

    # ------------------------------------------------------------------ routes
    def do_GET(self):
        self._dispatch(self._get)

    def do_POST(self):
        self._dispatch(self._post)

    def _not_allowed(self):
        self.close_connection = True  # (a HEAD client reads no body: do not reuse the connection)
        raise ApiError(405, f"method {self.command} is not allowed here", code="method_not_allowed")

    def do_PUT(self):
        self._dispatch(self._not_allowed)

    do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_PUT

    def send_error(self, code, message=None, explain=None):
        """The base class's errors (414, 431, 501 unknown method, 400 bad request line) as OpenAI-style
        JSON instead of HTML."""
        self.close_connection = True
        self._head_sent = False
        if not hasattr(self, "path"):  # the request line itself was refused
            self.path = ""
        try:
            self._send_json(code, ApiError(code, message or explain or f"HTTP error {code}",
                                           code="http_error").body())
        except OSError:  # the client already went away: nobody to answer
            pass

    def _get(self):
        path = urlsplit(self.path).path
        app = self.app
        if path == "/health":
            alive = app.engine.metrics()["thread_alive"]
            self._send_json(200 if alive else 503, {"status": "ok" if alive else "engine not running"})
        elif path == "/metrics":
            text = prom.render(app.engine.metrics(), dict(app.http_counts))
            self._send(200, text.encode(), prom.CONTENT_TYPE)
        elif path == "/v1/models":
            self._send_json(200, models_body(app.ctx.model_names, app.created))
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name not in app.ctx.model_names:
                raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
            self._send_json(200, models_body([name], app.created)["data"][0])
        elif path == "/tokenizer_info":
            self._send_json(200, tokenizer_info(app.ctx))
        elif path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            raise ApiError(405, f"use POST for {path}", code="method_not_allowed")
        else:
            raise ApiError(404, f"no route {path}", code="not_found")

    def _read_json(self) -> dict:
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:  # errors before the body is read close the connection (_dispatch)
            raise ApiError(400, "the request needs a Content-Length header (chunked bodies are not supported)")
        if len(set(lengths)) > 1:
            raise ApiError(400, f"conflicting Content-Length headers {lengths}")
        length = lengths[0]
        if not length.strip().isdigit():
            raise ApiError(400, f"bad Content-Length {length!r}: a non-negative integer is needed")
        n = int(length)
        if n > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is {n} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise ApiError(408, f"the request did not arrive within {self.timeout:g} s", code="request_timeout") from None
        self._body_read = True
        self._request_read()
        if len(raw) < n:
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(raw)} of its Content-Length {n} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, a 5000-digit integer, deep nesting
            reason = "it nests too deeply" if isinstance(err, RecursionError) else str(err)
            raise ApiError(400, f"We could not parse the JSON body of your request: {reason}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object", code="invalid_json")
        return body

    def _post(self):
        path = urlsplit(self.path).path
        if path == "/tokenize":
            return self._send_json(200, tokenize_body(self._read_json(), self.app.ctx))
        if path == "/detokenize":
            return self._send_json(200, detokenize_body(self._read_json(), self.app.ctx))
        if path not in ("/v1/completions", "/v1/chat/completions"):
            if path in _PATHS:
                raise ApiError(405, f"use GET for {path}", code="method_not_allowed")
            raise ApiError(404, f"no route {path}", code="not_found")
        parse = parse_chat if path == "/v1/chat/completions" else parse_completion
        self._generate(parse(self._read_json(), self.app.ctx))

    # ------------------------------------------------------------------ generation
    def _generate(self, req: GenerationRequest) -> None:
        engine = self.app.engine
        if req.params.max_tokens == 0:  # echo only: score the prompts, generate nothing
            done = [Completion(len(p), [], "", "length", [], []) for p in req.prompts for _ in range(req.n)]
            return self._reply(req, done)
        self._checked_at = time.monotonic()
        events: "queue.Queue" = queue.Queue()
        handles = []
        try:
            try:
                for i, prompt in enumerate(req.prompts):
                    handles += engine.submit_n(prompt, req.params, req.n,
                                               on_event=lambda j, event, base=i * req.n: events.put((base + j, event)))
            except Exception as err:
                raise engine_error(err) from None
            (self._stream if req.stream else self._collect)(req, events, len(handles))
        finally:
            for h in handles:  # no-op for finished ones; frees the slots of a vanished client
                h.cancel()

    def _next(self, events: "queue.Queue"):
        """The next (choice index, event), or None when the client has gone away (checked every poll_s)."""
        while True:
            if time.monotonic() - self._checked_at > self.app.poll_s:
                self._checked_at = time.monotonic()
                if self._client_gone():
                    self.close_connection = True
                    return None
            try:
                return events.get(timeout=self.app.poll_s)
            except queue.Empty:
                pass

    def _failure(self, completion) -> ApiError:
        if completion.finish_reason == "cancelled":
            what = "the server shut down" if self.app.draining.is_set() else "the engine stopped"
            return ApiError(503, f"{what} before the request finished", type="server_error", code="engine_stopped")
        return ApiError(500, f"generation failed: {completion.error}", type="server_error")

    def _collect(self, req: GenerationRequest, events, total: int) -> None:
        done = {}
        while len(done) < total:
            item = self._next(events)
            if item is None:
                return
            index, event = item
            if event.completion is not None:
                done[index] = event.completion
        for c in done.values():
            if c.finish_reason not in ("stop", "length"):
                raise self._failure(c)
        self._reply(req, [done[i] for i in range(total)])

    def _reply(self, req: GenerationRequest, done: list) -> None:
        """The non-streamed answer, with the prompt (echo) and logprobs when asked."""
        use = usage(sum(len(p) for p in req.prompts), sum(c.generated_tokens for c in done))
        texts = logprobs = None
        if req.chat and req.logprobs is not None:
            logprobs = [chat_logprobs_body(self.app.ctx.tokenizer, c.token_ids, c.logprobs or [],
                                           c.top_logprobs if req.logprobs else None) for c in done]
        elif req.echo or req.logprobs is not None:
            tokenizer, texts, logprobs, scored = self.app.ctx.tokenizer, [], [], {}
            for i, c in enumerate(done):
                prompt = req.prompts[i // req.n] if req.echo else []
                head = tokenizer.decode(prompt) if req.echo else ""
                texts.append(head + c.text)
                if req.logprobs is None:
                    continue
                if req.echo and i // req.n not in scored:
                    scored[i // req.n] = self.app.engine.score(prompt, req.logprobs)
                plp, ptop = scored.get(i // req.n, ([], []))
                top_n = req.logprobs
                ids = prompt + c.token_ids
                lps = ([None] + plp if req.echo else []) + list(c.logprobs or [])
                tops = (([None] + ptop) if req.echo and top_n else [None] * len(prompt)) + (
                    list(c.top_logprobs) if top_n and c.top_logprobs else [None] * len(c.token_ids))
                logprobs.append(logprobs_body(tokenizer, ids, lps, tops))
        self._send_json(200, completion_body(req, new_id(req.chat), now(), done, use, logprobs, texts))

    def _event_logprobs(self, req: GenerationRequest, event, offset: int):
        """A streamed chunk's logprobs object for the event's tokens, and the text offset after them."""
        tokenizer, tops = self.app.ctx.tokenizer, event.top_logprobs if req.logprobs else None
        if req.chat:
            return chat_logprobs_body(tokenizer, event.token_ids, event.logprobs, tops), offset
        body = logprobs_body(tokenizer, event.token_ids, event.logprobs, tops or [None] * len(event.token_ids), offset)
        return body, offset + sum(len(tokenizer.decode([t])) for t in event.token_ids)

    def _stream(self, req: GenerationRequest, events, total: int) -> None:
        rid, created = new_id(req.chat), now()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = self._head_sent = True
        self.app.count(urlsplit(self.path).path, 200)

        def send(obj) -> None:
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        if req.chat:
            for i in range(total):
                send(chunk_body(req, rid, created, i, "", role=True))
        finished, generated = 0, 0
        offsets = [0] * total  # completions' text_offset of each choice's next token
        while finished < total:
            item = self._next(events)
            if item is None:
                return
            index, event = item
            c = event.completion
            if c is not None and c.finish_reason not in ("stop", "length"):
                send(self._failure(c).body())  # an error event, then the end of the stream
                break
            lp = None
            if req.logprobs is not None and event.token_ids:
                lp, offsets[index] = self._event_logprobs(req, event, offsets[index])
            if event.text or c is not None or lp is not None or event.routed_experts:
                send(chunk_body(req, rid, created, index, event.text, c.finish_reason if c else None, logprobs=lp,
                                routed_experts=event.routed_experts))
            if c is not None:
                finished += 1
                generated += c.generated_tokens
        if req.include_usage and finished == total:
            send(chunk_body(req, rid, created, None, None, use=usage(sum(len(p) for p in req.prompts), generated)))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
