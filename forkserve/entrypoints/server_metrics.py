"""The server's /metrics endpoint: its Prometheus text, apart from the HTTP handlers."""

from __future__ import annotations

from forkserve.entrypoints.engine_loop import EngineLoop
from forkserve.metrics import prometheus_text as vllm_prometheus_text


_METRICS = [
    # (name, type, help, stats key or callable)
    ("requests_running", "gauge", "Requests with a sequence in the running batch.", "requests_running"),
    ("requests_waiting", "gauge", "Requests accepted but not yet scheduled (bounded by --max-waiting).", None),
    ("kv_pages_total", "gauge", "KV pages in the pool.", "kv_pages_total"),
    ("kv_pages_in_use", "gauge", "KV pages not free: held by requests or kept as prefix cache.", "kv_pages_in_use"),
    ("kv_pages_active", "gauge", "KV pages held by unfinished requests.", "kv_pages_active"),
    ("kv_pages_cached_idle", "gauge", "KV pages kept only as prefix cache (evictable).", "kv_pages_cached_idle"),
    ("prefix_cache_hit_rate", "gauge", "Share of finished requests' prompt tokens found in the prefix cache.",
     "prefix_cache_hit_rate"),
    ("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", "prompt_tokens"),
    ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens of finished requests served from the prefix cache.",
     "cached_prompt_tokens"),
    ("generation_tokens_total", "counter", "Tokens generated.", "generation_tokens"),
    ("generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 seconds.",
     "generation_tokens_per_s"),
    ("prefill_tokens_computed_total", "counter", "Prompt tokens computed (not taken from the cache).",
     "prefill_tokens_computed"),
    ("engine_steps_total", "counter", "Engine steps.", "steps"),
    ("preemptions_total", "counter", "Sequences preempted for lack of KV pages.", "preemptions"),
]


def prometheus_text(engine_loop: EngineLoop) -> str:
    stats = engine_loop.stats
    lines = []

    def add(name: str, kind: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP forkserve_{name} {help_text}", f"# TYPE forkserve_{name} {kind}",
                      f"forkserve_{name} {value:g}" if isinstance(value, float) else f"forkserve_{name} {value}"])

    for name, kind, help_text, key in _METRICS:
        add(name, kind, help_text, engine_loop.num_waiting if key is None else stats[key])
    add("requests_finished_total", "counter", "Requests that finished.", engine_loop.counts["finished"])
    add("requests_aborted_total", "counter", "Requests aborted (client gone).", engine_loop.counts["aborted"])
    add("requests_rejected_total", "counter", "Requests refused with 429 (too many waiting).",
        engine_loop.counts["rejected"])
    add("engine_alive", "gauge", "1 while the engine thread runs.", int(engine_loop.alive))
    add("engine_faults_total", "counter", "Engine steps that failed (their requests got 500; the engine was reset).",
        engine_loop.faults)
    lines += vllm_prometheus_text(engine_loop.vllm_metrics)
    return "\n".join(lines) + "\n"
