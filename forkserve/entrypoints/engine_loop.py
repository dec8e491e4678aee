"""`EngineLoop`: one thread owns the `Engine`; asyncio code submits requests and reads outputs.

The engine is not thread-safe, so only the loop thread calls it. Handlers on the event loop
send commands (add, abort) through a queue; the thread applies them between steps (after
arrivals it orders the waiting queue by longest cached prefix, with ageing so nothing starves),
steps while there is work and waits on the queue while there is none. After each step it sends events back
to the event loop (`call_soon_threadsafe`), one batch per step:

- `started`: the request has a sequence in the running batch (it no longer counts as waiting);
- `progress`: for streaming requests, a snapshot (`Engine.peek_output`) when tokens were added;
- `final`: the finished `RequestOutput`;
- `error`: the request could not run (status 400), or a step failed (status 500).

A step that raises is an engine fault: every unfinished request gets an `error` event, the
engine is reset (`recovery.reset_engine`), or rebuilt with `rebuild` when the reset fails, and
the loop goes on serving. Only when no engine can be had does the loop stop (`alive` False);
`on_dead` is then called so that the process can exit rather than live on without an engine.

Each HTTP request gets a `RequestStream`; closing it (or its handler ending early) aborts every
engine request of it that has not finished, which frees their KV pages.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from forkserve.engine.engine import Engine, PromptInput
from forkserve.metrics import engine_metrics
from forkserve.entrypoints.recovery import reset_engine
from forkserve.outputs import RequestOutput
from forkserve.sampling_params import BeamSearchParams, SamplingParams
from forkserve.search.beam import BeamGroup

logger = logging.getLogger(__name__)

_STOP = object()
_RATE_WINDOW_S = 10.0
# A streaming request's snapshot (Engine.peek_output) decodes all of its samples' text so far:
# for n=1024 and long outputs that is seconds. After a snapshot that took d seconds, the next
# one for that request waits SNAPSHOT_WAIT_FACTOR * d, so snapshots take at most 1/(1 + factor)
# of the engine thread and cannot hold back the other requests' steps.
SNAPSHOT_WAIT_FACTOR = 4.0


@dataclass
class StreamEvent:
    kind: str  # "progress", "final" or "error"
    request_id: str
    output: RequestOutput | None = None
    message: str | None = None
    status: int = 500  # of an error: 400 for a request the engine refused, 500 for an engine fault


class EngineDead(RuntimeError):
    """The engine thread stopped and no engine could be rebuilt; no request can run."""


def _serving(engine: Engine) -> Engine:
    """Requests arrive over time here: the scheduler shares each step between them (scheduler.py)."""
    engine.serve_arrivals()
    return engine


class RequestStream:
    """The events of one client request's engine requests, on the event loop."""

    def __init__(self, owner: "EngineLoop", request_ids: list[str]) -> None:
        self._owner = owner
        self.request_ids = request_ids
        self.unfinished = set(request_ids)
        self.not_started = set(request_ids)
        self._events: list[StreamEvent] = []
        self._ready = asyncio.Event()
        self.closed = False

    @property
    def done(self) -> bool:
        return not self.unfinished

    def _push(self, event: StreamEvent) -> None:
        if event.kind in ("final", "error"):
            self.unfinished.discard(event.request_id)
        self._events.append(event)
        self._ready.set()

    async def wait(self, timeout: float | None = None) -> list[StreamEvent]:
        """The events since the last call (empty after `timeout` seconds with none)."""
        if not self._events:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        events, self._events = self._events, []
        self._ready.clear()
        return events

    def close(self) -> None:
        """Abort what has not finished (a client went away, or the handler failed); idempotent."""
        if not self.closed:
            self.closed = True
            self._owner._close(self)


class EngineLoop:
    """Runs `engine` on its own thread; every public method is called from the event loop."""

    def __init__(self, engine: Engine, rebuild: Callable[[], Engine] | None = None,
                 on_dead: Callable[[], None] | None = None) -> None:
        self.engine = _serving(engine)
        self._rebuild = rebuild
        self.on_dead = on_dead  # called (on the engine thread) when the loop stops for good
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: str | None = None  # why the loop stopped for good
        self.faults = 0  # engine faults recovered from
        self.last_fault: str | None = None
        # event-loop side
        self._streams: dict[str, RequestStream] = {}
        self.num_waiting = 0  # submitted engine requests with no sequence scheduled yet
        self.counts = {"finished": 0, "aborted": 0, "rejected": 0}
        # loop-thread side
        self._subscribers: dict[str, bool] = {}  # request id -> wants progress events
        self._not_started: set[str] = set()
        self._last_tokens: dict[str, int] = {}
        self._next_snapshot: dict[str, float] = {}  # streaming request id -> earliest next snapshot
        self._generated = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._rate_samples: deque[tuple[float, int]] = deque()
        self._beams: dict[str, BeamGroup] = {}  # running beam searches by request id
        self.model_name = engine.config.model  # the model_name label of vLLM's metrics (the server sets it)
        self.stats: dict[str, float] = self._collect_stats()

    # ----------------------------------------------------------------------- event-loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="forkserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._commands.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, requests: list[tuple[str, PromptInput, SamplingParams | BeamSearchParams]],
               stream: bool) -> RequestStream:
        """Queue validated requests; their events arrive on the returned stream. A request with
        BeamSearchParams runs as a beam search, whose final output holds its hypotheses."""
        if not self.alive:
            raise EngineDead(self.error or "the engine is not running")
        handle = RequestStream(self, [request_id for request_id, _, _ in requests])
        for request_id, prompt, params in requests:
            self._streams[request_id] = handle
            kind = "beam" if isinstance(params, BeamSearchParams) else "add"
            self._commands.put((kind, request_id, prompt, params, stream))
        self.num_waiting += len(requests)
        return handle

    def _close(self, handle: RequestStream) -> None:
        for request_id in list(handle.unfinished):
            self._commands.put(("abort", request_id))
            self._streams.pop(request_id, None)
            self.counts["aborted"] += 1
        self.num_waiting -= len(handle.not_started)
        handle.not_started.clear()
        handle.unfinished.clear()

    def _deliver(self, started: list[str], events: list[StreamEvent]) -> None:
        for request_id in started:
            handle = self._streams.get(request_id)
            if handle is not None and request_id in handle.not_started:
                handle.not_started.discard(request_id)
                self.num_waiting -= 1
        for event in events:
            handle = self._streams.get(event.request_id)
            if handle is None:
                continue  # aborted meanwhile
            if event.kind in ("final", "error"):
                del self._streams[event.request_id]
                if event.request_id in handle.not_started:
                    handle.not_started.discard(event.request_id)
                    self.num_waiting -= 1
                if event.kind == "final":
                    self.counts["finished"] += 1
            handle._push(event)

    # ------------------------------------------------------------------------ loop thread
    def _post(self, started: list[str], events: list[StreamEvent]) -> None:
        if (started or events) and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._deliver, started, events)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass

    def _run(self) -> None:
        while True:
            events: list[StreamEvent] = []
            try:
                commands = self._next_commands(block=not self.engine.has_unfinished_requests() and not self._beams)
                if any(c is _STOP for c in commands):
                    return
                self._iterate(commands, events)
            except Exception as err:  # an engine fault: its state is unknown part-way through a step
                self._post([], events)  # what was decided before the fault still holds
                if not self._recover(err):
                    return

    def _iterate(self, commands: list[Any], events: list[StreamEvent]) -> None:
        engine = self.engine
        for command in commands:
            self._apply(command, events)
        if any(command[0] == "add" for command in commands):
            engine.prioritize_cached()  # arrivals: longest cached prefix first, with ageing
        started: list[str] = []
        if engine.has_unfinished_requests() or self._beams:
            for output in engine.step():
                self._finish(output, events)
            self._advance_beams(events)
            self._scan(started, events)
        self.stats = self._collect_stats()
        self._post(started, events)

    def _recover(self, err: Exception) -> bool:
        """Fail every unfinished request, then reset the engine (or build a new one); False if neither worked."""
        logger.exception("engine fault: every unfinished request fails; the engine is reset")
        self.faults += 1
        self.last_fault = f"the engine failed: {type(err).__name__}: {err}"
        self._post([], [StreamEvent("error", rid, message=self.last_fault) for rid in self._subscribers])
        self._subscribers.clear()
        self._not_started.clear()
        self._last_tokens.clear()
        self._next_snapshot.clear()
        self._beams.clear()  # their sequences belonged to the failed engine
        try:
            reset_engine(self.engine)
            return True
        except Exception:
            logger.exception("the engine could not be reset")
        if self._rebuild is not None:
            # The old engine's memory goes before the new one loads; meanwhile requests get 503.
            self.engine = None  # type: ignore[assignment]
            gc.collect()
            try:
                self.engine = _serving(self._rebuild())
                self.stats = self._collect_stats()
                logger.warning("a new engine was built after the fault")
                return True
            except Exception:
                logger.exception("no new engine could be built")
        self.error = f"{self.last_fault}; the engine could not be reset or rebuilt"
        if self.on_dead is not None:
            self.on_dead()
        return False

    def _next_commands(self, block: bool) -> list[Any]:
        """Pending commands; when idle, wait for one (waking each second to refresh stats)."""
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=1.0))
            except queue.Empty:
                pass
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: tuple, events: list[StreamEvent]) -> None:
        if command[0] in ("add", "beam"):
            kind, request_id, prompt, params, stream = command
            try:
                if kind == "beam":
                    self._beams[request_id] = BeamGroup(self.engine, request_id, prompt, params)
                else:
                    self.engine.add_request(request_id, prompt, params)
            except Exception as err:  # refused before it ran: this request's error alone
                if not isinstance(err, ValueError):  # (a ValueError is raised before anything is queued)
                    self._beams.pop(request_id, None)
                    self.engine.abort_request(request_id)
                events.append(StreamEvent("error", request_id, message=f"the engine refused the request: {err}",
                                          status=400))
                return
            self._subscribers[request_id] = stream
            self._not_started.add(request_id)
            self._last_tokens[request_id] = 0
        else:
            _, request_id = command
            if self._subscribers.pop(request_id, None) is not None:
                beam = self._beams.pop(request_id, None)
                if beam is not None:
                    beam.cancel()
                self.engine.abort_request(request_id)
                self._not_started.discard(request_id)
                self._last_tokens.pop(request_id, None)
                self._next_snapshot.pop(request_id, None)

    def _finish(self, output: RequestOutput, events: list[StreamEvent]) -> None:
        request_id = output.request_id
        self._generated += sum(len(c.token_ids) for c in output.outputs) - self._last_tokens.pop(request_id, 0)
        self._next_snapshot.pop(request_id, None)
        self._prompt_tokens += len(output.prompt_token_ids)
        self._cached_tokens += output.num_cached_tokens
        self._not_started.discard(request_id)
        if self._subscribers.pop(request_id, None) is not None:
            events.append(StreamEvent("final", request_id, output))

    def _advance_beams(self, events: list[StreamEvent]) -> None:
        """Beam searches whose beams all reported this round choose their next round (or finish)."""
        for request_id, group in list(self._beams.items()):
            if not group.waiting:
                group.advance()
                if group.done:
                    del self._beams[request_id]
                    self._finish(group.request_output(request_id), events)

    def _scan(self, started: list[str], events: list[StreamEvent]) -> None:
        """After a step: which requests started, and a snapshot of streaming ones that moved."""
        for request_id, stream in self._subscribers.items():
            progress = self.engine.progress(request_id)
            if progress is None:
                continue
            has_started, tokens = progress
            if request_id in self._not_started and has_started:
                self._not_started.discard(request_id)
                started.append(request_id)
            if tokens != self._last_tokens[request_id]:
                self._generated += tokens - self._last_tokens[request_id]
                self._last_tokens[request_id] = tokens
                if stream and time.monotonic() >= self._next_snapshot.get(request_id, 0.0):
                    start = time.monotonic()
                    events.append(StreamEvent("progress", request_id, self.engine.peek_output(request_id)))
                    end = time.monotonic()
                    self._next_snapshot[request_id] = end + SNAPSHOT_WAIT_FACTOR * (end - start)

    def _collect_stats(self) -> dict[str, float]:
        engine = self.engine
        now = time.monotonic()
        samples = self._rate_samples
        samples.append((now, self._generated))
        while len(samples) > 2 and now - samples[1][0] > _RATE_WINDOW_S:
            samples.popleft()
        span = now - samples[0][0]
        rate = (self._generated - samples[0][1]) / span if span > 0 else 0.0
        totals = engine.stats()
        # vLLM's metrics, taken here on the engine's thread; requests waiting are the server's count
        self.vllm_metrics = engine_metrics(engine, self.model_name, self.num_waiting)
        return {
            **engine.metrics(),
            "prompt_tokens": self._prompt_tokens,
            "cached_prompt_tokens": self._cached_tokens,
            "prefix_cache_hit_rate": self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
            "generation_tokens": self._generated,
            "generation_tokens_per_s": rate,
            "prefill_tokens_computed": totals["prefill_tokens_computed"],
            "steps": totals["steps"],
            "preemptions": totals["preemptions"],
        }
