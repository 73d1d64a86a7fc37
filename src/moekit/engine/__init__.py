"""Continuous-batching inference engine (the API: engine.py; the design: docs/architecture.md)."""

from .engine import Engine, RequestHandle
from .errors import ContextLengthError, EngineStoppedError, KVBudgetError, ParamError, QueueFullError
from .params import Completion, Event, SamplingParams

__all__ = ["Engine", "RequestHandle", "SamplingParams", "Completion", "Event", "ParamError",
           "ContextLengthError", "KVBudgetError", "QueueFullError", "EngineStoppedError"]
