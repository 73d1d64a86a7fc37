"""Errors the engine raises to its callers; each class names the HTTP status the server
answers with (`server.app.engine_error`)."""

from __future__ import annotations

from typing import Optional


class ParamError(ValueError):
    """A request parameter with an invalid value; `param` is its name (OpenAI's `param`). HTTP 400."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(ParamError):
    """The prompt (plus max_tokens) does not fit the model's context window. HTTP 400."""


class KVBudgetError(ParamError):
    """The request needs more KV cache than the whole budget: it can never be admitted. HTTP 400."""


class QueueFullError(RuntimeError):
    """`max_queue` requests are already waiting for admission; try again later. HTTP 429."""


class EngineStoppedError(RuntimeError):
    """The engine was stopped (or its thread died); it accepts no more requests. HTTP 503."""
