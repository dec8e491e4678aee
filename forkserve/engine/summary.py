"""End-of-batch summary: what a batch computed against what it had to, from two `Engine.stats()`."""
from __future__ import annotations

import time
from collections import deque
from typing import Sequence

# Reported as they stand at the end rather than as differences.
LEVELS = ("peak_pages_in_use", "pages_in_use", "kv_pages")


def batch_summary(before: dict[str, int | float], after: dict[str, int | float],
                  pages_series: Sequence[int] = ()) -> dict[str, int | float]:
    """Counters over the batch, plus `prefix_reuse`: the share of prompt tokens not computed.

    With the engine's pages-in-use series (`Engine.pages_in_use_series`), peak_pages_in_use is the
    batch's own peak (over its steps) rather than the engine's since start. prefix_reuse is floored
    at 0: when preemption recomputes more than the prefix tree saved, prefill_tokens_computed
    against unique_prompt_tokens shows that cost.
    """
    out = {k: v if k in LEVELS else v - before.get(k, 0) for k, v in after.items()}
    steps = int(out.get("steps", 0))
    if 0 < steps <= len(pages_series):
        out["peak_pages_in_use"] = max(list(pages_series)[-steps:])
    prompt = out.get("prompt_tokens", 0)
    out["prefix_reuse"] = max(0.0, round(1 - out.get("prefill_tokens_computed", 0) / prompt, 4)) if prompt else 0.0
    return out


def describe(summary: dict[str, int | float]) -> str:
    s = summary
    unique = s["unique_prompt_tokens"]
    ratio = f" ({s['prefill_tokens_computed'] / unique:.3f}x unique)" if unique else ""
    return (f"batch summary: {s['prompt_tokens']} prompt tokens, {unique} unique, "
            f"{s['prefill_tokens_computed']} prefill tokens computed{ratio}, prefix reuse {s['prefix_reuse']:.1%}, "
            f"peak {s['peak_pages_in_use']} of {s['kv_pages']} KV pages, {s['preemptions']} preemptions, "
            f"{s['pins_dropped']} pinned prefixes dropped")


class StepTimes:
    """A step hook (`EngineCounters.hooks`) keeping (time.perf_counter() at the step's start, decode
    rows, prefill tokens) of the last steps: where a batch's time went (`step_breakdown`)."""

    def __init__(self, max_steps: int = 1 << 16) -> None:
        self.series: deque[tuple[float, int, int]] = deque(maxlen=max_steps)

    def __call__(self, decodes: int, prefills: int) -> None:
        self.series.append((time.perf_counter(), decodes, prefills))


def step_breakdown(series: list[tuple[float, int, int]], end: float) -> dict[str, float | int]:
    """Wall time of a batch's steps split into pure decode steps and steps with prefill tokens.

    series holds (start time, decode rows, prefill tokens) per step (`StepTimes.series`)
    and end is when the batch finished; the slowest prefill step (its time, and its place among the
    batch's steps) tells a one-off stall (a kernel built at its first use) from uniformly slow
    steps. A step's time is taken as the gap to the next step's start; with async scheduling that
    gap is the GPU time of the step before, a one-step shift that runs of similar steps make
    negligible (where in a step the host waits can move time between two neighbours: a slow
    step next to a fast one is that, not a stall).
    """
    decode_s = prefill_s = slowest_prefill_s = 0.0
    decode_steps = decode_rows = prefill_steps = 0
    slowest_prefill_index = -1
    for index, ((start, decodes, prefills), following) in enumerate(zip(series, [s[0] for s in series[1:]] + [end])):
        if prefills:
            prefill_steps += 1
            prefill_s += following - start
            if following - start > slowest_prefill_s:
                slowest_prefill_s, slowest_prefill_index = following - start, index
        else:
            decode_steps += 1
            decode_rows += decodes
            decode_s += following - start
    return dict(decode_steps=decode_steps, decode_seconds=round(decode_s, 3),
                mean_decode_batch=round(decode_rows / decode_steps, 1) if decode_steps else 0.0,
                prefill_steps=prefill_steps, prefill_seconds=round(prefill_s, 3),
                slowest_prefill_step_seconds=round(slowest_prefill_s, 3), slowest_prefill_step_index=slowest_prefill_index)
