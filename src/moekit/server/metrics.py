"""`GET /metrics`: the engine's gauges and counters in the Prometheus text format (0.0.4)."""

from __future__ import annotations

from typing import Dict, List, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_GAUGES = [
    ("moekit_queue_depth", "queue_depth", "Requests waiting for admission (submitted, not yet running)."),
    ("moekit_running_requests", "running", "Requests being prefilled or decoded."),
    ("moekit_kv_cache_capacity_tokens", "kv_capacity_tokens", "KV-cache budget in tokens (blocks x block size)."),
    ("moekit_kv_cache_reserved_tokens", "kv_reserved_tokens", "KV-cache tokens in blocks held by running requests."),
    ("moekit_kv_cache_used_tokens", "kv_used_tokens", "KV-cache tokens written by running requests."),
    ("moekit_kv_cache_usage_ratio", "kv_usage", "Blocks in use / blocks total (0..1)."),
    ("moekit_kv_cache_blocks_total", "kv_blocks_total", "KV-cache blocks in the budget."),
    ("moekit_kv_cache_blocks_in_use", "kv_blocks_in_use", "KV-cache blocks held by running requests (shared once)."),
    ("moekit_kv_cache_blocks_cached", "kv_blocks_cached", "KV-cache blocks registered for prefix hits (in use or not)."),
    ("moekit_prefix_cache_enabled", "prefix_caching", "1 when prefix caching is on (off for models with unpaged layers)."),
    ("moekit_prefix_cache_hit_rate", "prefix_cache_hit_rate",
     "Prompt tokens served from the prefix cache / prompt tokens, since start."),
    ("moekit_generation_tokens_per_second", "generation_tokens_per_s",
     "Generated tokens per second over the last 10 s."),
    ("moekit_prompt_tokens_per_second", "prompt_tokens_per_s", "Prompt tokens prefilled per second over the last 10 s."),
]
_COUNTERS = [
    ("moekit_generation_tokens_total", "generation_tokens", "Generated tokens since start."),
    ("moekit_prompt_tokens_total", "prompt_tokens", "Prompt tokens prefilled since start."),
    ("moekit_engine_steps_total", "steps", "Engine steps (batched forwards) since start."),
    ("moekit_requests_submitted_total", "requests_submitted", "Requests (choices) accepted since start."),
    ("moekit_preemptions_total", "preemptions", "Requests preempted (blocks freed, recomputed later) since start."),
    ("moekit_prefix_cache_hit_tokens_total", "prefix_hit_tokens", "Prompt tokens served from the prefix cache."),
    ("moekit_prefix_cache_query_tokens_total", "prefix_query_tokens", "Prompt tokens of admitted requests."),
]


def _fmt(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))  # bools as 0 / 1


def render(metrics: dict, http_counts: Dict[Tuple[str, int], int]) -> str:
    lines: List[str] = []
    for name, key, help_ in _GAUGES:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {_fmt(metrics[key])}"]
    totals = metrics["totals"]
    for name, key, help_ in _COUNTERS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {_fmt(totals.get(key, 0))}"]
    name = "moekit_requests_finished_total"
    lines += [f"# HELP {name} Requests (choices) finished, by finish reason.", f"# TYPE {name} counter"]
    for reason in ("stop", "length", "cancelled", "error"):
        lines.append(f'{name}{{reason="{reason}"}} {totals.get("finished_" + reason, 0)}')
    name = "moekit_requests_rejected_total"
    lines += [f"# HELP {name} Requests refused because the admission queue was full (HTTP 429).",
              f"# TYPE {name} counter", f"{name} {totals.get('rejected_queue_full', 0)}"]
    name = "moekit_http_requests_total"
    lines += [f"# HELP {name} HTTP requests answered, by path and status.", f"# TYPE {name} counter"]
    for (path, status), count in sorted(http_counts.items()):
        lines.append(f'{name}{{path="{path}",status="{status}"}} {count}')
    return "\n".join(lines) + "\n"
