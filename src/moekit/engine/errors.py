"""Errors the engine raises to its callers (the server maps each to an HTTP status).

    ParamError        a request parameter has an invalid value (`.param` names it)      -> 400
    ContextLengthError  prompt + max_tokens exceed the model's context window            -> 400
    KVBudgetError     the request could never fit in the KV budget, even alone           -> 400
    QueueFullError    the admission queue is full; try again later                       -> 429
    EngineStoppedError  the engine is shut down (or its thread died)                     -> 503
"""

from __future__ import annotations

from typing import Optional


class ParamError(ValueError):
    """A request parameter with an invalid value; `param` is its name (OpenAI's `param`)."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(ParamError):
    """The prompt (plus max_tokens) does not fit the model's context window."""


class KVBudgetError(ParamError):
    """The request needs more KV cache than the whole budget: it can never be admitted."""


class QueueFullError(RuntimeError):
    """`max_queue` requests are already waiting for admission (the server answers 429)."""


class EngineStoppedError(RuntimeError):
    """The engine was stopped; it accepts no more requests."""
