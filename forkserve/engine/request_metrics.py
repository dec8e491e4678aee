"""Per-request timing and size histograms, named and bucketed as vLLM's (forkserve/metrics.py reads them)."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from forkserve.outputs import RequestOutput
from forkserve.sampling_params import SamplingParams

# vLLM's buckets (seconds; tokens)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(7) for m in (1, 2, 5))
N_BUCKETS = (1, 2, 5, 10, 20)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class HistogramData:
    """Observations counted per bucket (not cumulative) plus their count and sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> dict[str, int]:
        """Prometheus' buckets: upper bound -> observations at or below it."""
        buckets, running = {}, 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += count
            buckets[bound] = running
        return buckets


@dataclass
class EngineMetrics:
    """What finished requests add up to, besides the engine's own counters."""

    generation_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    time_to_first_token: HistogramData = field(default_factory=lambda: HistogramData(TTFT_BUCKETS))
    time_per_output_token: HistogramData = field(default_factory=lambda: HistogramData(TPOT_BUCKETS))
    e2e_latency: HistogramData = field(default_factory=lambda: HistogramData(LATENCY_BUCKETS))
    queue_time: HistogramData = field(default_factory=lambda: HistogramData(LATENCY_BUCKETS))
    request_prompt_tokens: HistogramData = field(default_factory=lambda: HistogramData(TOKEN_BUCKETS))
    request_generation_tokens: HistogramData = field(default_factory=lambda: HistogramData(TOKEN_BUCKETS))
    request_params_n: HistogramData = field(default_factory=lambda: HistogramData(N_BUCKETS))
    request_params_max_tokens: HistogramData = field(default_factory=lambda: HistogramData(TOKEN_BUCKETS))
    request_max_num_generation_tokens: HistogramData = field(default_factory=lambda: HistogramData(TOKEN_BUCKETS))
    prefill_time: HistogramData = field(default_factory=lambda: HistogramData(LATENCY_BUCKETS))
    decode_time: HistogramData = field(default_factory=lambda: HistogramData(LATENCY_BUCKETS))
    inference_time: HistogramData = field(default_factory=lambda: HistogramData(LATENCY_BUCKETS))
    iteration_tokens: HistogramData = field(default_factory=lambda: HistogramData(ITERATION_BUCKETS))

    def record_finished(self, output: RequestOutput, params: SamplingParams) -> None:
        self.prompt_tokens += len(output.prompt_token_ids)
        self.cached_prompt_tokens += output.num_cached_tokens
        for completion in output.outputs:
            reason = completion.finish_reason or "abort"
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        m = output.metrics
        generated = sum(len(c.token_ids) for c in output.outputs)
        self.request_prompt_tokens.observe(len(output.prompt_token_ids))
        self.request_generation_tokens.observe(generated)
        self.request_params_n.observe(params.n)
        if params.max_tokens is not None:
            self.request_params_max_tokens.observe(params.max_tokens)
        self.request_max_num_generation_tokens.observe(max((len(c.token_ids) for c in output.outputs), default=0))
        if m is None:
            return
        if m.first_scheduled_time is not None and m.first_token_time is not None:
            self.prefill_time.observe(m.first_token_time - m.first_scheduled_time)
        if m.first_scheduled_time is not None and m.finished_time is not None:
            self.inference_time.observe(m.finished_time - m.first_scheduled_time)
        if m.first_token_time is not None and m.finished_time is not None:
            self.decode_time.observe(m.finished_time - m.first_token_time)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.time_to_first_token.observe(m.first_token_time - m.arrival_time)
            if m.last_token_time is not None and m.num_generation_tokens > 1:
                self.time_per_output_token.observe((m.last_token_time - m.first_token_time) /
                                                   (m.num_generation_tokens - 1))
        if m.finished_time is not None:
            self.e2e_latency.observe(m.finished_time - m.arrival_time)
