"""The core's step loop and request lifecycle: schedule, hand the worker a step plan, read back tokens
(prompts come in tokenized: inputs.py; outputs go out detokenized: output_processor.py)."""
from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Sequence as Seq

from forkserve.config import EngineConfig
from forkserve.engine.forks import fork_kv, new_children
from forkserve.engine.in_flight import InFlightStep
from forkserve.engine.generation_defaults import generation_defaults
from forkserve.engine.inputs import InputProcessor, PromptInput, check_local_model, load_tokenizer
from forkserve.engine.output_processor import OutputProcessor
from forkserve.engine.pages import PagePool
from forkserve.engine.request_metrics import EngineMetrics
from forkserve.engine.scheduler import ScheduledSeq, Scheduler
from forkserve.engine.sequence import Request, Sequence, SequenceStatus
from forkserve.engine.sharing import CascadeRule
from forkserve.engine.stats import EngineCounters, engine_stats, live_metrics, request_progress
from forkserve.engine.step_builder import StepBuilder
from forkserve.engine.stopping import StopChecker
from forkserve.engine.structured import StructuredOutputs
from forkserve.engine.tree import PrefixTree
from forkserve.outputs import RequestOutput
from forkserve.sampling_params import SamplingParams
from forkserve.worker.plan import StepResult
from forkserve.worker.worker import Worker

logger = logging.getLogger(__name__)


class Engine:
    """Loads the model, owns the KV pool, the prefix tree and the scheduler, and steps them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        check_local_model(config.model)
        cascade_rule = None if config.disable_cascade_attn else CascadeRule()
        self.worker = Worker(config, cascade_rule.max_levels if cascade_rule is not None else 0)
        self.model_config = self.worker.model_config
        self.max_model_len = self.worker.max_model_len
        self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(config.tokenizer or config.model)
        self.outputs = OutputProcessor(self.tokenizer)
        self.stop_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.stop_token_ids.add(self.tokenizer.eos_token_id)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, self.stop_token_ids,
                                            self.worker.device.type == "cuda")
        self.inputs = InputProcessor(self.tokenizer, self.model_config.vocab_size, self.max_model_len,
                                     config.max_logprobs, config.max_n, self.structured.check)
        # the front ends' validation (engine/inputs.py), where they have always called it
        self.make_prompt, self.check_params = self.inputs.make_prompt, self.inputs.check_params
        self.check_fits, self.check_width = self.inputs.check_fits, self.inputs.check_width
        # SamplingParams fields the checkpoint's generation_config.json sets (vLLM's generation_config="auto")
        self.default_sampling_overrides = generation_defaults(config.model, config.generation_config)
        self.request_metrics = EngineMetrics()  # vLLM's per-request histograms (time to first token, ...)
        self.steps = StepBuilder(config.page_size, cascade_rule, self.stop_token_ids)
        self.pool = PagePool(self.worker.num_pages, config.page_size)
        host = PagePool(self.worker.num_host_slots, config.page_size) if self.worker.num_host_slots else None
        self.tree = PrefixTree(self.pool, self.steps.transfers.copy, config.enable_prefix_caching, host,
                               self.steps.transfers)
        self.scheduler = Scheduler(self.tree, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                                   config.enable_chunked_prefill, config.reserve_output_kv,
                                   config.min_shared_prefix_len)
        self.stops = StopChecker(self.stop_token_ids, self.max_model_len, self.outputs, self.scheduler,
                                 self.request_metrics)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.counters = EngineCounters()
        self._in_flight: InFlightStep | None = None  # async scheduling: the step whose draws are still on the GPU
        logger.info("engine ready: %s on %s (%s), %d KV pages of %d tokens, max_model_len %d",
                    config.model, self.worker.device, self.worker.dtype, self.pool.num_pages, config.page_size,
                    self.max_model_len)

    # ----------------------------------------------------------------------------- requests
    def get_tokenizer(self):  # vLLM's `LLMEngine.get_tokenizer`
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:  # vLLM's: drop every cached page no sequence holds; True when none is left
        self.tree.clear_cache()
        return self.tree.num_evictable_pages == 0

    def add_request(self, request_id: str, prompt: PromptInput | str | dict, params: SamplingParams) -> Request:
        """Enqueue a request (forking into its samples at its first draw); a prompt not yet validated
        (text or a prompt dict, as vLLM's `LLMEngine.add_request` takes) is validated here."""
        if not isinstance(prompt, PromptInput):
            label = f"request {request_id}"
            prompt = self.make_prompt(prompt, label, self.check_params(params, label).truncate_prompt_tokens)
        return self.add_requests([(request_id, prompt, params)])[0]

    def add_requests(self, batch: Seq[tuple[str, PromptInput, SamplingParams]]) -> list[Request]:
        """Enqueue validated requests as one planned batch (planner.py); none if an id is taken."""
        seen: set[str] = set()
        for request_id, prompt, params in batch:
            if request_id in self.requests or request_id in seen:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.check_fits(prompt, params, f"request {request_id}")
            seen.add(request_id)
        requests = [self.new_request(request_id, prompt, params, max(params.n, params.best_of or 1))
                    for request_id, prompt, params in batch]
        for request in requests:
            self.requests[request.request_id] = request
        self._enqueue(self.structured.route(requests))  # constrained ones wait for their grammars
        return requests

    def _enqueue(self, requests: list[Request]) -> None:
        """Queue requests as one planned batch, each constrained one at the start of its grammar."""
        self.structured.start(requests)
        self.scheduler.add_batch([request.seqs[0] for request in requests])

    def new_request(self, request_id: str, prompt: PromptInput, params: SamplingParams, num_samples: int = 1,
                    hold: bool = False) -> Request:
        """A request with its first sequence, not queued (hold: a search root, run when probed or forked)."""
        self.counters.prompt_tokens += len(prompt.token_ids)
        bad_words = self.inputs.bad_words_token_ids(params.bad_words) if params.bad_words else []
        return Request.start(request_id, prompt.text, prompt.token_ids, params, next(self._seq_ids), num_samples,
                             hold, bad_words)

    def fork(self, parent: Sequence, k: int, request: Request | None = None) -> list[Sequence]:
        """k new sequences continuing parent's tokens on its KV (forks.fork_kv), queued to run: in
        parent's request (samples, beams) or starting `request` whose prompt is parent's tokens (tree
        search). Children of a running parent run next step with it; others wait for admission."""
        children = new_children(parent, k, request, self._seq_ids)
        for child in children:
            child.grammar = self.structured.child_grammar(parent, child.request)
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

    def extend(self, seq: Sequence, tokens: Seq[int]) -> None:  # a held branch takes chosen tokens (beam search)
        seq.token_ids.extend(tokens)

    def release(self, seq: Sequence) -> None:
        self.scheduler.abort(seq, forget=True)  # now, pages only it held included (a pruned branch)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its pages; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is not None and not self.structured.abort(request):
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def prioritize_cached(self) -> None:  # waiting queue by longest cached prefix, with ageing (a server)
        self.scheduler.prioritize_cached()

    def serve_arrivals(self) -> None:  # requests arrive over time (a server): steps shared among them
        self.scheduler.fair = True

    def reset_after_fault(self) -> bool:
        """Drop the queued step unread and abort every request; False if sequences are still scheduled."""
        self._in_flight = None
        for request_id in list(self.requests):
            self.abort_request(request_id)
        return not self.scheduler.has_work() and not self.requests

    def progress(self, request_id: str) -> tuple[bool, int] | None:
        """Whether an unfinished request has started (left the waiting queue), and its output tokens so far."""
        request = self.requests.get(request_id)
        return None if request is None else request_progress(request)

    def metrics(self) -> dict[str, int]:  # live figures for /metrics: requests, KV pages by use
        return live_metrics(self.requests.values(), self.pool, self.tree)

    def peek_output(self, request_id: str) -> RequestOutput | None:
        """An unfinished request so far (a streaming server diffs them), None when unknown; between steps."""
        request = self.requests.get(request_id)
        return None if request is None else self.outputs.snapshot(request)

    # ----------------------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """Run one batch; the outputs of requests that finished in it (async scheduling: in the step before)."""
        finished = self._admit_compiled() if self.structured.compiling else []
        return finished + self._step()

    def _admit_compiled(self) -> list[RequestOutput]:
        """Queue the requests whose grammars compiled (those that failed end with finish_reason "abort")."""
        ready, failed = self.structured.compiled(idle=not self.scheduler.has_work() and self._in_flight is None)
        self._enqueue(ready)
        return self._finished_outputs([request.seqs[0] for request in failed])

    def _step(self) -> list[RequestOutput]:
        batch = self.steps.order(self.scheduler.schedule())
        self.stops.start_step(batch)
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
        self.request_metrics.iteration_tokens.observe(sum(item.num_new_tokens for item in batch))
        if overlap:
            previous = self._in_flight
            rows = [self.steps.sampling_row(seq, seq.seed) for seq in samplers]
            bitmask = self.structured.launched_bitmask_source(samplers, previous.launched if previous else None)
            plan = self.steps.build(batch, rows=rows)
            launched = self.worker.launch(plan, previous.launched if previous else None, bitmask)
            self.steps.take_prompt_logprobs(batch, plan, launched.prompt_logprobs)
            self._advance(batch)
            self._in_flight = InFlightStep.queued(samplers, launched, self.max_model_len)
            return finished + (self._finished_outputs(previous.resolve(self.stops)) if previous else [])
        draws = [self.steps.draw_request(seq) for seq in samplers]
        plan = self.steps.build(batch, draws=draws, bitmask=self.structured.token_bitmask(samplers, draws))
        result: StepResult | None = self.worker.execute(plan)
        if result is not None:
            self.steps.take_prompt_logprobs(batch, plan, result.prompt_logprobs)
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
                member.token_ids.append(result.sampled.token_ids[result.first_row[i] + k])
                self.stops.took_token(member, result.sampled, result.first_row[i] + k)
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
        return self._finished_outputs(step.resolve(self.stops)) if step is not None else []

    def _finished_outputs(self, seqs: list[Sequence]) -> list[RequestOutput]:
        finished: list[RequestOutput] = []
        for request in dict.fromkeys(seq.request for seq in seqs):
            if request.is_finished and request.request_id in self.requests:
                del self.requests[request.request_id]
                if request.metrics is not None:
                    request.metrics.finished_time = time.time()
                output = self.outputs.make_output(request)
                self.request_metrics.record_finished(output, request.params)
                finished.append(output)
        return finished

    @property
    def pages_in_use(self) -> int:  # held by sequences, held branches or pins: not free, not idle cached
        return self.pool.num_pages - self.pool.num_free - self.tree.num_evictable_pages

    def shutdown(self) -> None:  # other tensor-parallel ranks stop now (else when freed or at exit)
        self.worker.close()

    def stats(self) -> dict[str, int | float]:  # totals since start (stats.engine_stats)
        return engine_stats(self.counters, self.scheduler, self.pool.num_pages, self.pages_in_use,
                            dict(self.worker.stats(), prefix_host_hit_tokens=self.tree.host_hit_tokens))

    def pages_in_use_series(self) -> list[int]:  # at the start of each of the last (up to 65,536) steps
        return list(self.counters.pages_series)
