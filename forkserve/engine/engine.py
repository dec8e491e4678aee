"""The step loop and request lifecycle of the core: it schedules, hands the worker a step plan, and
reads back tokens (prompts come in validated and tokenized, outputs go out detokenized: inputs.py,
output_processor.py)."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Sequence as Seq

from forkserve.config import EngineConfig
from forkserve.engine.forks import fork_kv, new_children
from forkserve.engine.inputs import InputProcessor, PromptInput, load_tokenizer
from forkserve.engine.output_processor import OutputProcessor
from forkserve.engine.pages import PagePool
from forkserve.engine.scheduler import ScheduledSeq, Scheduler
from forkserve.engine.sequence import Request, Sequence, SequenceStatus
from forkserve.engine.sharing import CascadeRule
from forkserve.engine.stats import EngineCounters, engine_stats, live_metrics, request_progress
from forkserve.engine.step_builder import StepBuilder
from forkserve.engine.stopping import StopChecker, reaches_length
from forkserve.engine.tree import PrefixTree
from forkserve.outputs import RequestOutput
from forkserve.sampling_params import SamplingParams
from forkserve.worker.plan import PLACEHOLDER, SamplerOutput, StepResult
from forkserve.worker.worker import LaunchedStep, Worker

logger = logging.getLogger(__name__)


@dataclass
class InFlightStep:
    """A queued step (async scheduling): its sampling sequences, in row order, and its draws."""

    seqs: list[Sequence]
    launched: LaunchedStep


class Engine:
    """Loads the model, owns the KV pool, the prefix tree and the scheduler, and steps them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        cascade_rule = None if config.disable_cascade_attn else CascadeRule()
        self.worker = Worker(config, cascade_rule.max_levels if cascade_rule is not None else 0)
        self.model_config = self.worker.model_config
        self.max_model_len = self.worker.max_model_len
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer or config.model)
        self.inputs = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.max_model_len,
                                     config.max_logprobs, config.max_n)
        self.outputs = OutputProcessor(self.tokenizer)
        self.stop_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.stop_token_ids.add(self.tokenizer.eos_token_id)
        self.steps = StepBuilder(config.page_size, cascade_rule, self.stop_token_ids)
        self.pool = PagePool(self.worker.num_pages, config.page_size)
        self.tree = PrefixTree(self.pool, self.steps.page_copies, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.tree, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                                   config.enable_chunked_prefill, config.reserve_output_kv,
                                   config.min_shared_prefix_len)
        self.stops = StopChecker(self.stop_token_ids, self.max_model_len, self.outputs, self.scheduler)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.counters = EngineCounters()
        self._in_flight: InFlightStep | None = None  # async scheduling: the step whose draws are still on the GPU
        logger.info("engine ready: %s on %s (%s), %d KV pages of %d tokens, max_model_len %d",
                    config.model, self.worker.device, self.worker.dtype, self.pool.num_pages, config.page_size,
                    self.max_model_len)

    # ----------------------------------------------------------------------------- requests
    def make_prompt(self, prompt: object, label: str) -> PromptInput:
        return self.inputs.make_prompt(prompt, label)

    def check_params(self, params: object, label: str) -> SamplingParams:
        return self.inputs.check_params(params, label)

    def check_width(self, value: int | None, name: str, label: str) -> None:
        self.inputs.check_width(value, name, label)

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams) -> Request:
        """Enqueue a validated request: one sequence, which forks into the samples at its first draw."""
        return self.add_requests([(request_id, prompt, params)])[0]

    def add_requests(self, batch: Seq[tuple[str, PromptInput, SamplingParams]]) -> list[Request]:
        """Enqueue validated requests as one batch: the planner orders them so that every prefix
        they share is prefilled once (planner.py). Nothing is queued if an id is taken."""
        seen: set[str] = set()
        for request_id, _, _ in batch:
            if request_id in self.requests or request_id in seen:
                raise ValueError(f"request id {request_id!r} is already in use")
            seen.add(request_id)
        requests = [self.new_request(request_id, prompt, params, max(params.n, params.best_of or 1))
                    for request_id, prompt, params in batch]
        self.scheduler.add_batch([request.seqs[0] for request in requests])
        for request in requests:
            self.requests[request.request_id] = request
        return requests

    def new_request(self, request_id: str, prompt: PromptInput, params: SamplingParams, num_samples: int = 1,
                    hold: bool = False) -> Request:
        """A request with its first sequence, not queued.

        With hold, that sequence starts as a held one with nothing computed: a search root, which
        runs when probed or forked.
        """
        request = Request(request_id, prompt.text, prompt.token_ids, params, num_samples=num_samples, hold=hold)
        self.counters.prompt_tokens += len(prompt.token_ids)
        seq = Sequence(next(self._seq_ids), request, 0, list(prompt.token_ids), len(prompt.token_ids),
                       request.sample_seed(0), logprobs=[] if params.logprobs is not None else None)
        if hold:
            seq.status = SequenceStatus.FINISHED
        request.seqs.append(seq)
        return request

    # ----------------------------------------------------------------------------- branches
    def fork(self, parent: Sequence, k: int, request: Request | None = None) -> list[Sequence]:
        """k new sequences continuing parent's tokens on its KV, queued to run.

        They join parent's request (more samples or beams), or start `request` whose prompt is
        parent's tokens (a tree-search step). Children of a running parent run next step with
        it; others wait for admission. See `forks.fork_kv` for how the KV is shared.
        """
        children = new_children(parent, k, request, self._seq_ids)
        fork_kv(self.scheduler, parent, children)
        for child in children:
            if parent.status is SequenceStatus.RUNNING and child.kv is not None:
                self.scheduler.add_running(child)
            else:
                self.scheduler.add(child)
        return children

    def probe(self, seq: Sequence, k: int) -> None:
        """Compute seq's remaining tokens, then record its k best next tokens and hold it (beam search)."""
        seq.probe_k, seq.candidates = k, None
        if seq.status is SequenceStatus.FINISHED:
            self.scheduler.resume(seq)

    def run_until(self, done: Callable[[], bool], what: str) -> None:
        """Step until done() (search drivers wait on their sequences this way); never spins idle."""
        while not done():
            if not self.scheduler.has_work():
                raise RuntimeError(f"{what}: waiting on sequences but the engine has nothing to run")
            self.step()

    def release(self, seq: Sequence) -> None:
        """Stop seq and free its pages now, pages only it held included (a pruned branch)."""
        self.scheduler.abort(seq, forget=True)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its pages; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def prioritize_cached(self) -> None:
        """Order the waiting queue by longest cached prefix, with ageing (a server, after arrivals)."""
        self.scheduler.prioritize_cached()

    def progress(self, request_id: str) -> tuple[bool, int] | None:
        """Whether an unfinished request has started (left the waiting queue), and its output tokens so far."""
        request = self.requests.get(request_id)
        return None if request is None else request_progress(request)

    def metrics(self) -> dict[str, int]:
        """Live figures for a server's /metrics: requests running and unfinished, KV pages by use."""
        return live_metrics(self.requests.values(), self.pool, self.tree)

    def peek_output(self, request_id: str) -> RequestOutput | None:
        """A snapshot of an unfinished request (its samples' tokens, text and logprobs so far), for
        callers that show progress before `step` returns the final output (a streaming server
        diffs consecutive snapshots); None when the id is unknown or already returned. Call it
        between steps, on the thread that steps the engine; it costs the new tokens' decoding.
        """
        request = self.requests.get(request_id)
        return None if request is None else self.outputs.snapshot(request)

    # ----------------------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the outputs of requests that finished in it (or, with async
        scheduling, in the step before it, whose tokens are read once this one is queued)."""
        batch = self.steps.order(self.scheduler.schedule())
        samplers = [item.seq for item in batch if item.samples]
        finished: list[RequestOutput] = []
        had_in_flight = self._in_flight is not None
        overlap = self._can_overlap(samplers)
        if had_in_flight and not overlap:
            # This step needs the previous one's tokens on the host first; sequences those
            # tokens end drop out of it.
            finished = self._resolve_in_flight()
            batch = [item for item in batch if not item.seq.is_finished]
            samplers = [seq for seq in samplers if not seq.is_finished]
            overlap = self._can_overlap(samplers)
        if not batch:
            finished += self._resolve_in_flight()
            if not had_in_flight and self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress: no sequence fits in the KV pool")
            return finished  # sequences the previous step's tokens ended may have made room
        self.counters.record_step(batch, self.pages_in_use)
        if overlap:
            previous = self._in_flight
            rows = [self.steps.sampling_row(seq, seq.seed) for seq in samplers]
            launched = self.worker.launch(self.steps.build(batch, rows=rows), previous.launched if previous else None)
            self._advance(batch)
            max_model_len = self.max_model_len
            for row, seq in enumerate(samplers):
                seq.token_ids.append(PLACEHOLDER)
                seq.num_pending += 1
                seq.pending_row = row
                seq.final_in_flight = reaches_length(len(seq.token_ids), seq, max_model_len)
            self._in_flight = InFlightStep(samplers, launched)
            return finished + (self._resolve(previous) if previous else [])
        draws = [self.steps.draw_request(seq) for seq in samplers]
        result: StepResult | None = self.worker.execute(self.steps.build(batch, draws=draws))
        self._advance(batch)
        if result is None:
            return finished
        for i, seq in enumerate(samplers):
            if seq.probe_k:
                seq.probe_k, seq.candidates = 0, result.top[i]
                self.scheduler.finish(seq, hold=True)
                continue
            # Fork before the first sample takes its token: the children copy its tokens so far.
            extra = len(draws[i].rows) - 1
            family = [seq] + (self.fork(seq, extra) if extra else [])
            for k, member in enumerate(family):
                self._append_token(member, result.sampled, result.first_row[i] + k)
        return finished + self._finished_outputs(samplers)

    def _can_overlap(self, samplers: list[Sequence]) -> bool:
        """May this step be queued before the previous step's tokens are read (async scheduling)?"""
        return self.config.async_scheduling and bool(samplers) and \
            not any(seq.needs_tokens_at_once for seq in samplers)

    def _advance(self, batch: list[ScheduledSeq]) -> None:
        """The step's KV is computed (or queued to be): move progress, publish finished prefill pages."""
        for item in batch:
            item.seq.num_computed_tokens += item.num_new_tokens
            if self.config.enable_prefix_caching and item.seq.num_computed_tokens <= item.seq.num_prompt_tokens:
                # Prefill chunk done: its full pages become reusable by others right away.
                self.tree.publish(item.seq.kv, item.seq.token_ids[:item.seq.num_computed_tokens])
        self.scheduler.after_step(batch)

    def _resolve_in_flight(self) -> list[RequestOutput]:
        step, self._in_flight = self._in_flight, None
        return self._resolve(step) if step is not None else []

    def _resolve(self, step: InFlightStep) -> list[RequestOutput]:
        """Put a queued step's draws in place of its placeholders, then run the stop checks.

        A sequence may have queued one more step meanwhile (one more placeholder after this one);
        if this token ends it, that step's token is dropped. Aborted sequences are skipped.
        """
        result = step.launched.result()
        ended = []
        for row, seq in enumerate(step.seqs):
            if seq.status is SequenceStatus.FINISHED:
                continue
            seq.num_pending -= 1
            seq.token_ids[len(seq.token_ids) - seq.num_pending - 1] = result.token_ids[row]
            if self.stops.took_token(seq, result, row):
                if seq.num_pending:
                    del seq.token_ids[-seq.num_pending:]
                    seq.num_pending = 0
                ended.append(seq)
        return self._finished_outputs(ended)

    def _finished_outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        finished: list[RequestOutput] = []
        for request in dict.fromkeys(seq.request for seq in seqs):
            if request.is_finished and request.request_id in self.requests:
                del self.requests[request.request_id]
                finished.append(self.outputs.make_output(request))
        return finished

    @property
    def pages_in_use(self) -> int:
        """Pages held by sequences, held branches or pins: all but the free and the idle cached ones."""
        return self.pool.num_pages - self.pool.num_free - self.tree.num_evictable_pages

    def _append_token(self, seq: Sequence, result: SamplerOutput, row: int) -> None:
        seq.token_ids.append(result.token_ids[row])
        self.stops.took_token(seq, result, row)

    def stats(self) -> dict[str, int | float]:
        """Totals since start (see `stats.engine_stats`)."""
        return engine_stats(self.counters, self.scheduler, self.pool.num_pages, self.pages_in_use, self.worker.stats())

    def pages_in_use_series(self) -> list[int]:
        """Pages in use at the start of each of the last (up to 65,536) steps, oldest first."""
        return list(self.counters.pages_series)
