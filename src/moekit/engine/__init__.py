"""Continuous-batching inference engine (see engine.py for the API and the design notes in
scheduler.py, kv.py and forward.py)."""

from .engine import Engine, RequestHandle
from .errors import (ContextLengthError, EngineStoppedError, KVBudgetError, ParamError,
                     QueueFullError)
from .params import Completion, Event, SamplingParams

__all__ = ["Engine", "RequestHandle", "SamplingParams", "Completion", "Event", "ParamError",
           "ContextLengthError", "KVBudgetError", "QueueFullError", "EngineStoppedError"]
