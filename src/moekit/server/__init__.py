"""OpenAI-compatible HTTP server over the continuous-batching engine (`moekit serve`).

    app.py            HTTP handling (standard library), streaming, error statuses
    protocol.py       request validation and response bodies of the OpenAI API
    chat_template.py  messages -> prompt (the checkpoint's Jinja template, or ChatML)
    metrics.py        /metrics in the Prometheus text format
    cli.py            `moekit serve`
"""

from .app import OpenAIServer

__all__ = ["OpenAIServer"]
