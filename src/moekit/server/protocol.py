"""The OpenAI API surface: request validation and response bodies.

A bad field raises ApiError(400) naming it in `param`. Sampling fields go through
`moekit.sampling`'s checks (the same messages as `generate` and the engine); on top:
temperature <= 2 (OpenAI's range), top_k -1 or 0 = off (vLLM). Supported: model, prompt /
messages, max_tokens (chat also max_completion_tokens; default 16 for completions, the rest
of the context window, capped by the KV budget, for chat), temperature (default 1.0), top_p,
n, stream, stream_options.include_usage, stop, seed, user; vLLM's top_k, min_p (0 = off),
repetition_penalty (> 0, 1.0 = off; HF semantics over prompt + output), ignore_eos, min_tokens;
OpenAI's presence_penalty and frequency_penalty ([-2, 2], over the generated tokens), logit_bias,
stop_token_ids; completions' logprobs (top-n, up to 20, with tokens, token_logprobs, top_logprobs,
text_offset; also streamed, per chunk) and echo (the prompt first, scored by `Engine.score`; echo
with max_tokens 0 scores without generating: lm-eval's log-likelihood request; not with stream);
chat's logprobs (bool) + top_logprobs (0..20): `{"content": [{token, logprob, bytes, top_logprobs}]}`
per choice, and per chunk when streamed. `return_routed_experts` (vLLM/SGLang's name; needs
`--enable-return-routed-experts`, else 400): `choices[i].routed_experts`, per generated token that
was fed, [MoE layer][k] expert ids (engine/params.py); on chunks, the entries known since the
last one. Accepted only at their neutral values: suffix, best_of,
tools, response_format other than text.
Unknown fields are ignored. Completions `prompt`: a string, a list of strings, a list of
token ids or a list of such lists; choice index = prompt_index * n + j.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..engine import Completion, SamplingParams
from ..engine.params import MAX_TOP_LOGPROBS
from ..sampling import (SamplingParamError, check_logit_bias, check_max_tokens, check_min_p, check_penalty,
                        check_repetition_penalty, check_seed,
                        check_stop_strings, check_temperature, check_top_k, check_top_p, normalise_stops)

MAX_N = 16


class ApiError(Exception):
    """An error reply: HTTP status + OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: Optional[str], message: str, code: Optional[str] = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    chat: bool
    model: str
    prompts: List[List[int]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: Optional[int] = None  # completions: the top-n logprobs per token (0: only the chosen token's)
    echo: bool = False  # completions: the prompt first, with its logprobs when logprobs is set


# ---------------------------------------------------------------------------- field checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sampling_check(field: str, check, *args, **kwargs) -> None:
    """Run a moekit.sampling check; its SamplingParamError becomes a 400 naming `field`."""
    try:
        check(*args, **kwargs)
    except SamplingParamError as err:
        raise bad(field, str(err)) from None


def _checked(body, name, check, default, **kwargs):
    """body[name] passed through a moekit.sampling check, or default when unset."""
    v = body.get(name)
    if v is None:
        return default
    _sampling_check(name, check, v, name, **kwargs)
    return v


def _bool(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be a boolean, got {v!r}")
    return v


def _stop(body) -> List[str]:
    v = body.get("stop")
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v  # OpenAI: one string or a list of them
    if not isinstance(items, list):
        raise bad("stop", f"'stop' must be a string or a list of strings, got {v!r}")
    _sampling_check("stop", check_stop_strings, items)
    return items


def _stop_token_ids(body, vocab_size: int) -> List[int]:
    v = body.get("stop_token_ids") or []
    if not isinstance(v, list) or not all(_is_int(t) for t in v):  # vLLM: a flat list of ids
        raise bad("stop_token_ids", f"'stop_token_ids' must be a list of token ids, got {v!r}")
    _sampling_check("stop_token_ids", normalise_stops, v, None, vocab_size, name="stop_token_ids")
    return v


def _unsupported(body, neutral: Dict[str, Any]) -> None:
    for name, ok in neutral.items():
        v = body.get(name)
        if v is not None and not ok(v):
            raise bad(name, f"'{name}'={v!r} is not supported by this server", code="unsupported_parameter")


_NEUTRAL: Dict[str, Any] = {}


def _logit_bias(body, vocab_size: int):
    v = body.get("logit_bias")
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise bad("logit_bias", f"'logit_bias' must be an object {{token id: bias}}, got {v!r}")
    pairs = []
    for key, value in v.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad("logit_bias", f"'logit_bias' keys must be token ids, got {key!r}")
        pairs.append((int(key), value))
    _sampling_check("logit_bias", check_logit_bias, pairs, vocab_size)
    return tuple((t, float(b)) for t, b in pairs)


def _logprobs(body) -> Optional[int]:
    v = body.get("logprobs")
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v <= MAX_TOP_LOGPROBS:
        raise bad("logprobs", f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {v!r}")
    return v


def _chat_logprobs(body) -> Optional[int]:
    """Chat's `logprobs` (bool) and `top_logprobs` (0..20, needs logprobs): the top-n, or None when off."""
    on = _bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if on else None
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}")
    if not on:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")
    return top


def _request(body: dict, ctx, chat: bool, model: str, prompts: List[List[int]],
             extra_stop=(), logprobs: Optional[int] = None, echo: bool = False) -> GenerationRequest:
    """The sampling fields shared by both endpoints, checked, with the prompts: the request."""
    temperature = float(_checked(body, "temperature", check_temperature, 1.0))
    if temperature > 2:
        raise bad("temperature", f"temperature must be <= 2 (OpenAI's range), got {body['temperature']!r}")
    top_p = float(_checked(body, "top_p", check_top_p, 1.0))
    top_k = body.get("top_k")
    off = _is_int(top_k) and top_k in (-1, 0)  # vLLM: -1 (or 0) = off
    top_k = None if off else _checked(body, "top_k", check_top_k, None)
    min_p = _checked(body, "min_p", check_min_p, None)
    repetition_penalty = float(_checked(body, "repetition_penalty", check_repetition_penalty, 1.0))
    presence = float(_checked(body, "presence_penalty", check_penalty, 0.0))
    frequency = float(_checked(body, "frequency_penalty", check_penalty, 0.0))
    logit_bias = _logit_bias(body, ctx.vocab_size)
    min_tokens = _checked(body, "min_tokens", check_max_tokens, 0, minimum=0)
    routed = _bool(body, "return_routed_experts")
    if routed and not ctx.return_routed_experts:
        raise bad("return_routed_experts", "'return_routed_experts' needs the server started with "
                                           "--enable-return-routed-experts", code="unsupported_parameter")
    n = 1 if body.get("n") is None else body["n"]
    if not _is_int(n):
        raise bad("n", f"'n' must be an integer, got {n!r}")
    if not 1 <= n <= MAX_N:
        raise bad("n", f"'n' must be >= 1, got {n!r}" if n < 1 else f"'n' must be <= {MAX_N}, got {n!r}")
    check_prompt_count(len(prompts), n, ctx.max_prompts, "messages" if chat else "prompt")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not stream):
        raise bad("stream_options", "'stream_options' must be an object and needs stream=true")
    include_usage = bool(opts and opts.get("include_usage"))
    seed = _checked(body, "seed", check_seed, None)
    stop = _stop(body)
    ignore_eos = _bool(body, "ignore_eos")
    stop_ids = _stop_token_ids(body, ctx.vocab_size)
    name = "max_tokens"
    max_tokens = _checked(body, name, check_max_tokens, None, minimum=0 if echo else 1)  # echo + 0: score only
    if chat and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
        max_tokens = _checked(body, name, check_max_tokens, None)
    longest, what = max(len(p) for p in prompts), "messages" if chat else "prompt"
    if longest >= ctx.max_seq_len:
        raise bad(what, f"this model's maximum context length is {ctx.max_seq_len} tokens, but the {what} hold "
                        f"{longest} tokens, which leaves no room to generate", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max(1, min(ctx.max_seq_len, ctx.kv_capacity) - longest) if chat else 16
    elif longest + max_tokens > ctx.max_seq_len:
        raise bad(name, f"this model's maximum context length is {ctx.max_seq_len} tokens, but you requested "
                        f"{longest + max_tokens} tokens ({longest} in the {what}, "
                        f"{max_tokens} in the completion); lower {name}", code="context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            min_p=None if min_p is None else float(min_p), repetition_penalty=repetition_penalty,
                            stop=tuple(stop) + tuple(extra_stop), stop_token_ids=tuple(stop_ids),
                            ignore_eos=ignore_eos, logprobs=logprobs is not None, top_logprobs=logprobs or 0,
                            presence_penalty=presence, frequency_penalty=frequency, logit_bias=logit_bias,
                            min_tokens=min_tokens, return_routed_experts=routed)
    return GenerationRequest(chat, model, prompts, params, n, stream, include_usage, logprobs, echo)


def _model(body, ctx) -> str:
    model = body.get("model")
    if model is None:
        raise bad("model", "you must provide a model parameter", code=None)
    if not isinstance(model, str):
        raise bad("model", f"'model' must be a string, got {model!r}")
    if model not in ctx.model_names:
        raise ApiError(404, f"The model `{model}` does not exist. Available: {', '.join(ctx.model_names)}",
                       param="model", code="model_not_found")
    return model


def _encode(ctx, text: str, param: str, add_special_tokens: bool = True) -> List[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON allows lone surrogates ("\ud800"); text cannot hold them
        raise bad(param, f"'{param}' is not valid Unicode text: {err.reason} at position {err.start}") from None
    ids = ctx.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    if not ids:
        raise bad(param, f"'{param}' encodes to no tokens; give at least one token of text")
    return ids


def check_prompt_count(prompts: int, n: int, limit: int, param: str = "prompt") -> None:
    """One request may ask for at most `limit` completions (prompts x n): it cannot fill the queue alone."""
    if prompts * n > limit:
        raise bad(param, f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} completions; "
                         f"the limit per request is {limit} (split it into several requests)")


# ---------------------------------------------------------------------------- endpoints
def parse_completion(body: dict, ctx) -> GenerationRequest:
    model = _model(body, ctx)
    _unsupported(body, {**_NEUTRAL, "suffix": lambda v: v == "", "best_of": lambda v: v == 1})
    logprobs, echo = _logprobs(body), _bool(body, "echo")
    if echo and body.get("stream"):
        raise bad("echo", "'echo' with stream=true is not supported; use a non-streamed request",
                  code="unsupported_parameter")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "you must provide a prompt", code=None)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):  # before tokenizing them all
        check_prompt_count(len(prompt), 1, ctx.max_prompts)
    if isinstance(prompt, str):
        prompts = [_encode(ctx, prompt, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [_encode(ctx, p, "prompt") for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)):
        prompts = prompt
    else:
        raise bad("prompt", "'prompt' must be a non-empty string, list of strings, list of token ids, "
                            "or list of token-id lists")
    for p in prompts:
        if any(not 0 <= t < ctx.vocab_size for t in p):
            raise bad("prompt", f"'prompt' holds token ids outside [0, {ctx.vocab_size})")
    return _request(body, ctx, False, model, prompts, logprobs=logprobs, echo=echo)


def parse_messages(messages) -> List[Dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages.[{i}]", f"message {i} must be an object, got {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"messages.[{i}].role", f"message {i} has an invalid role {role!r}")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages.[{i}].content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"messages.[{i}].content", f"message {i} content must be a string or text parts")
        out.append({"role": role, "content": content})
    return out


def parse_chat(body: dict, ctx) -> GenerationRequest:
    model = _model(body, ctx)
    _unsupported(body, {**_NEUTRAL, "tools": lambda v: v == [], "tool_choice": lambda v: v == "none",
                        "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text"})
    messages = parse_messages(body.get("messages"))
    try:
        text = ctx.chat_template.render(messages)
    except ValueError as err:
        raise bad("messages", f"the chat template failed on these messages: {err}") from None
    prompt = _encode(ctx, text, "messages", add_special_tokens=False)
    return _request(body, ctx, True, model, [prompt], extra_stop=ctx.chat_template.stop,
                    logprobs=_chat_logprobs(body))


# ---------------------------------------------------------------------------- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def byte_level_alphabet() -> Dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = byte_level_alphabet()


def token_text(tokenizer, token_id: int) -> str:
    """A token's text, or for a token that is part of a multi-byte character its bytes written as
    OpenAI does ("bytes:\\xe2\\x80"), so that distinct tokens never share a text."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)  # a special token shows as itself
    if "\ufffd" not in text:
        return text
    piece = tokenizer.id_to_token(token_id) or ""
    if not all(ch in BYTE_LEVEL for ch in piece):
        return text
    return "bytes:" + "".join(f"\\x{BYTE_LEVEL[ch]:02x}" for ch in piece)


def logprobs_body(tokenizer, ids: List[int], logprobs: List[Optional[float]], tops: List[Optional[list]],
                  start: int = 0) -> dict:
    """A completions `logprobs` object: each token's text, its logprob (None for the first prompt token,
    which has no context), the top alternatives {text: logprob} (None where not asked) and the character
    offset of each token in the returned text (from `start`)."""
    texts = [token_text(tokenizer, t) for t in ids]
    offsets, at = [], start
    for t in ids:
        offsets.append(at)
        at += len(tokenizer.decode([t]))
    top = [None if t is None else {token_text(tokenizer, i): lp for i, lp in t} for t in tops]
    return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def token_bytes(tokenizer, token_id: int) -> List[int]:
    """The UTF-8 bytes a token stands for (its raw bytes for a byte-level piece of a character)."""
    piece = tokenizer.id_to_token(token_id) or ""
    if piece and all(ch in BYTE_LEVEL for ch in piece):
        return [BYTE_LEVEL[ch] for ch in piece]
    return list(tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))


def chat_logprobs_body(tokenizer, ids: List[int], logprobs: List[float], tops: Optional[List[list]]) -> dict:
    """A chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token_id: int, lp: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": lp, "bytes": token_bytes(tokenizer, token_id)}

    content = []
    for j, (t, lp) in enumerate(zip(ids, logprobs)):
        alts = tops[j] if tops else []
        content.append({**entry(t, lp), "top_logprobs": [entry(i, alp) for i, alp in alts]})
    return {"content": content, "refusal": None}


def completion_body(req: GenerationRequest, rid: str, created: int, completions: List[Completion], use: dict,
                    logprobs: Optional[List[dict]] = None, texts: Optional[List[str]] = None) -> dict:
    """The non-streamed reply; `completions` in choice order (`logprobs` / `texts`: per choice, when the
    request asked for logprobs / echo)."""
    if req.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None if logprobs is None else logprobs[i],
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
    else:
        choices = [{"index": i, "text": c.text if texts is None else texts[i],
                    "logprobs": None if logprobs is None else logprobs[i], "finish_reason": c.finish_reason}
                   for i, c in enumerate(completions)]
    if req.params.return_routed_experts:
        for choice, c in zip(choices, completions):
            choice["routed_experts"] = c.routed_experts or []
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": choices, "usage": use}


def chunk_body(req: GenerationRequest, rid: str, created: int, index: Optional[int], text: Optional[str],
               finish_reason: Optional[str] = None, role: bool = False, use: Optional[dict] = None,
               logprobs: Optional[dict] = None, routed_experts: Optional[list] = None) -> dict:
    """One streaming chunk: a choice's delta (index given; `logprobs` of its tokens and the
    `routed_experts` entries known since the last chunk, when asked) or the final usage chunk (index None)."""
    obj = "chat.completion.chunk" if req.chat else "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": []}
    if index is not None:
        if req.chat:
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        if req.params.return_routed_experts:
            choice["routed_experts"] = routed_experts or []
        body["choices"].append(choice)
    if req.include_usage:
        body["usage"] = use  # null on the content chunks, filled on the last one (OpenAI's format)
    return body


# ---------------------------------------------------------------------------- tokenizer endpoints (vLLM's)
def tokenize_body(body: dict, ctx) -> dict:
    """POST /tokenize {"model", "prompt"} or {"model", "messages"} (the chat template applied)."""
    _model(body, ctx)
    if "messages" in body:
        try:
            text = ctx.chat_template.render(parse_messages(body["messages"]))
        except ValueError as err:
            raise bad("messages", f"the chat template failed on these messages: {err}") from None
        ids = ctx.tokenizer.encode(text, add_special_tokens=False).ids
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("prompt", f"'prompt' must be a string, got {prompt!r}")
        ids = _encode(ctx, prompt, "prompt", add_special_tokens=_bool(body, "add_special_tokens", True)) if prompt else []
    return {"count": len(ids), "max_model_len": ctx.max_seq_len, "tokens": ids}


def detokenize_body(body: dict, ctx) -> dict:
    """POST /detokenize {"model", "tokens"} -> {"prompt": text}."""
    _model(body, ctx)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_int(t) and 0 <= t < ctx.vocab_size for t in tokens):
        raise bad("tokens", f"'tokens' must be a list of token ids in [0, {ctx.vocab_size})")
    return {"prompt": ctx.tokenizer.decode(tokens)}


def tokenizer_info(ctx) -> dict:
    """GET /tokenizer_info: what a client needs to tokenize as the server does."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "vocab_size": ctx.tokenizer.get_vocab_size(),
            "model_max_length": ctx.max_seq_len, "chat_template": ctx.chat_template.source}


def models_body(names: List[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "moekit"}
                                       for n in names]}


def now() -> int:
    return int(time.time())
