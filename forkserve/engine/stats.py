"""The engine's counters: what each step computed, and the tracing hooks a step calls."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from forkserve.engine.pages import PagePool
from forkserve.engine.scheduler import ScheduledSeq, Scheduler
from forkserve.engine.sequence import Request, SequenceStatus
from forkserve.engine.tree import PrefixTree

StepHook = Callable[[int, int], None]  # called as a step starts, with its decode rows and prefill tokens


@dataclass
class EngineCounters:
    """Totals since start (`Engine.stats`), the pages-in-use series, and the step hooks."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens computed other than one-token decodes (recomputation included)
    decode_tokens: int = 0
    peak_pages: int = 0
    steps: int = 0
    pages_series: deque[int] = field(default_factory=lambda: deque(maxlen=1 << 16))
    hooks: list[StepHook] = field(default_factory=list)  # per-step tracing, when asked for (summary.StepTimes)

    def record_step(self, batch: list[ScheduledSeq], pages_in_use: int) -> None:
        self.steps += 1
        self.peak_pages = max(self.peak_pages, pages_in_use)
        self.pages_series.append(pages_in_use)
        decodes = prefills = 0
        for item in batch:
            seq = item.seq
            if item.num_new_tokens == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                decodes += 1
            else:
                prefills += item.num_new_tokens
        self.decode_tokens += decodes
        self.prefill_tokens += prefills
        for hook in self.hooks:
            hook(decodes, prefills)


def engine_stats(counters: EngineCounters, scheduler: Scheduler, kv_pages: int, pages_in_use: int,
                 worker_stats: dict[str, int]) -> dict[str, int | float]:
    """Totals since start: what was computed, what the prefix tree saved, pages in use.

    prompt_tokens counts each request's prompt once (its samples share it);
    prefill_tokens_computed is what the model actually ran other than decodes, so with
    forks and prefix reuse it is far below prompt_tokens x n. Pages in use are those held
    by sequences, held search branches and pins (idle cache excluded); see
    `Engine.pages_in_use_series` for the per-step history. kv_pages_read is the KV pages one
    layer's attention read, summed over steps, against kv_pages_listed, what plain attention
    would read (each sequence its whole table): shared-prefix attention's saving, in
    cascade_steps steps (the worker's figures).
    """
    c, planner = counters, scheduler.planner
    return dict(prompt_tokens=c.prompt_tokens, unique_prompt_tokens=planner.unique_prompt_tokens,
                prefill_tokens_computed=c.prefill_tokens, decode_tokens=c.decode_tokens,
                peak_pages_in_use=c.peak_pages, pages_in_use=pages_in_use, steps=c.steps,
                preemptions=scheduler.num_preemptions, pins_dropped=planner.pins_dropped,
                kv_pages=kv_pages, **worker_stats)


def request_progress(request: Request) -> tuple[bool, int]:
    """Whether a request has a sequence out of the waiting queue, and its output tokens known so far."""
    started = any(s.status is not SequenceStatus.WAITING for s in request.seqs)
    return started, sum(len(s.token_ids) - s.num_prompt_tokens - s.num_pending for s in request.seqs)


def live_metrics(requests: Iterable[Request], pool: PagePool, tree: PrefixTree) -> dict[str, int]:
    """Requests running (a sequence in the batch) and unfinished; KV pages in use, of them idle cached."""
    requests = list(requests)
    running = sum(1 for r in requests if any(s.status is SequenceStatus.RUNNING for s in r.seqs))
    in_use, evictable = pool.num_pages - pool.num_free, tree.num_evictable_pages
    return dict(requests_running=running, requests_unfinished=len(requests), kv_pages_total=pool.num_pages,
                kv_pages_in_use=in_use, kv_pages_cached_idle=evictable, kv_pages_active=in_use - evictable)
