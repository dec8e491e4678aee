"""vLLM's metrics: `LLM.get_metrics()` and the `vllm:*` lines of the server's /metrics.

The types mirror `vllm.v1.metrics.reader` (Counter, Gauge, Histogram with cumulative buckets),
and the names are vLLM's, so a vLLM dashboard (Grafana) reads forkserve unchanged. Counters are
named without `_total` here, as Prometheus families are; the text exposition adds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forkserve.engine.request_metrics import HistogramData


@dataclass
class Metric:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Counter(Metric):
    value: int | float = 0


@dataclass
class Gauge(Metric):
    value: int | float = 0


@dataclass
class Histogram(Metric):
    count: int = 0
    sum: float = 0.0
    buckets: dict[str, int] = field(default_factory=dict)  # upper bound -> observations at or below it


def _histogram(name: str, data: HistogramData, labels: dict[str, str]) -> Histogram:
    return Histogram(name, dict(labels), data.count, data.total, data.cumulative())


def engine_metrics(engine: Any, model_name: str, num_waiting: int | None = None) -> list[Metric]:
    """A snapshot of vLLM's metrics for `engine` (call it on the thread that steps the engine).
    `num_waiting`: requests queued before the engine (a server's), else the engine's own."""
    labels = {"model_name": model_name, "engine": "0"}
    live = engine.metrics()
    running = live["requests_running"]
    waiting = live["requests_unfinished"] - running if num_waiting is None else num_waiting
    m = engine.request_metrics
    stats = engine.stats()
    metrics: list[Metric] = [
        Gauge("vllm:num_requests_running", dict(labels), running),
        Gauge("vllm:num_requests_waiting", dict(labels), waiting),
        Gauge("vllm:kv_cache_usage_perc", dict(labels), engine.pages_in_use / max(live["kv_pages_total"], 1)),
        Counter("vllm:prompt_tokens", dict(labels), stats["prompt_tokens"]),
        Counter("vllm:generation_tokens", dict(labels), m.generation_tokens),
        Counter("vllm:prefix_cache_queries", dict(labels), m.prompt_tokens),
        Counter("vllm:prefix_cache_hits", dict(labels), m.cached_prompt_tokens),
        Counter("vllm:num_preemptions", dict(labels), stats["preemptions"]),
    ]
    for reason in ("stop", "length", "abort"):
        metrics.append(Counter("vllm:request_success", {**labels, "finished_reason": reason},
                               m.finished_by_reason.get(reason, 0)))
    metrics += [
        _histogram("vllm:time_to_first_token_seconds", m.time_to_first_token, labels),
        _histogram("vllm:time_per_output_token_seconds", m.time_per_output_token, labels),
        _histogram("vllm:inter_token_latency_seconds", m.time_per_output_token, labels),
        _histogram("vllm:e2e_request_latency_seconds", m.e2e_latency, labels),
        _histogram("vllm:request_queue_time_seconds", m.queue_time, labels),
        _histogram("vllm:request_prompt_tokens", m.request_prompt_tokens, labels),
        _histogram("vllm:request_generation_tokens", m.request_generation_tokens, labels),
        _histogram("vllm:request_params_n", m.request_params_n, labels),
        _histogram("vllm:request_params_max_tokens", m.request_params_max_tokens, labels),
        _histogram("vllm:request_max_num_generation_tokens", m.request_max_num_generation_tokens, labels),
        _histogram("vllm:request_prefill_time_seconds", m.prefill_time, labels),
        _histogram("vllm:request_decode_time_seconds", m.decode_time, labels),
        _histogram("vllm:request_inference_time_seconds", m.inference_time, labels),
        _histogram("vllm:iteration_tokens_total", m.iteration_tokens, labels),
        Gauge("vllm:cache_config_info", {**labels, "block_size": str(engine.config.block_size),
                                         "num_gpu_blocks": str(live["kv_pages_total"]),
                                         "enable_prefix_caching": str(engine.config.enable_prefix_caching)}, 1),
    ]
    return metrics


def _labels(labels: dict[str, str], **extra: str) -> str:
    merged = {**labels, **extra}
    return "{" + ",".join(f'{k}="{v}"' for k, v in merged.items()) + "}" if merged else ""


def prometheus_text(metrics: list[Metric]) -> list[str]:
    """Prometheus text exposition lines (HELP-less: the names are vLLM's, documented there)."""
    lines: list[str] = []
    typed: set[str] = set()
    for metric in metrics:
        kind = type(metric).__name__.lower()
        if metric.name not in typed:
            typed.add(metric.name)
            lines.append(f"# TYPE {metric.name} {kind}")
        if isinstance(metric, Counter):
            lines.append(f"{metric.name}_total{_labels(metric.labels)} {metric.value}")
        elif isinstance(metric, Gauge):
            lines.append(f"{metric.name}{_labels(metric.labels)} {metric.value}")
        elif isinstance(metric, Histogram):
            for bound, count in metric.buckets.items():
                lines.append(f"{metric.name}_bucket{_labels(metric.labels, le=bound)} {count}")
            lines.append(f"{metric.name}_count{_labels(metric.labels)} {metric.count}")
            lines.append(f"{metric.name}_sum{_labels(metric.labels)} {metric.sum}")
    return lines
