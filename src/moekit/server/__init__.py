"""OpenAI-compatible HTTP server over the continuous-batching engine (`moekit serve`; modules: docs/architecture.md)."""

from .app import OpenAIServer

__all__ = ["OpenAIServer"]
