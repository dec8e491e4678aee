"""The step loop: request lifecycle, stop conditions, detokenisation and outputs."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch

from forkserve.attention.base import AttentionBackend
from forkserve.attention.cascade import CascadePlanner, CascadeRule
from forkserve.attention.flashinfer import FlashInferBackend
from forkserve.attention.reference import ReferenceBackend
from forkserve.config import (DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig, resolve_device,
                              resolve_dtype)
from forkserve.engine.forks import DrawRequest, ForkingSampler, StepDraws, fork_kv
from forkserve.engine.memory import StepMemory, kv_pool_bytes, profile_step_memory
from forkserve.engine.pages import KVCache, PagePool
from forkserve.engine.scheduler import ScheduledSeq, Scheduler
from forkserve.engine.sequence import Request, Sequence, SequenceStatus
from forkserve.engine.tree import PrefixTree
from forkserve.model.config import ModelConfig
from forkserve.model.loader import load_model
from forkserve.engine.generation_defaults import generation_defaults
from forkserve.engine.request_metrics import EngineMetrics
from forkserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from forkserve.runner import PLACEHOLDER, LaunchedStep, ModelRunner
from forkserve.cuda_graphs import DecodeGraphs, graph_batch_sizes
from forkserve.sampler import Sampler, SamplerOutput, SamplingRow, TokenBitmask
from forkserve.sampling_params import ALL_LOGPROBS, SamplingParams, is_valid_text
from forkserve.structured.grammars import Grammars
from forkserve.structured.matcher import GrammarState

logger = logging.getLogger(__name__)


@dataclass
class PromptInput:
    """A validated prompt: its token ids and, when given as text, the text."""

    token_ids: list[int]
    text: str | None = None


@dataclass
class InFlightStep:
    """A queued step (async scheduling): its sampling sequences, in row order, and its draws."""

    seqs: list[Sequence]
    launched: LaunchedStep


class Engine:
    """Loads the model, owns the KV pool, the prefix tree and the scheduler, and steps them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        _check_local_model(config.model)
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_dir(config.model)
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {self.model_config.max_position_embeddings}")
        self.tokenizer = None if config.skip_tokenizer_init else _load_tokenizer(config.tokenizer or config.model)
        self.model, _ = load_model(config.model, self.dtype, self.device, config.load_format)
        self.model.compile_kernels()
        self.cascade_rule = None if config.disable_cascade_attn else CascadeRule()
        self.step_memory: StepMemory | None = None  # the profile steps' peaks, where they sized the pool
        backend = self._make_backend()  # before the pool: its workspace is part of what the pool's sizing finds in use
        sampler = Sampler(config.seed, self.device)
        self.kv_cache = self._make_kv_cache(sampler)
        self.pool = PagePool(self.kv_cache.num_pages, config.block_size)
        self.tree = PrefixTree(self.pool, self.kv_cache.copy_pages, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.tree, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                                   config.enable_chunked_prefill, config.reserve_output_kv,
                                   config.min_shared_prefix_len)
        self.runner = ModelRunner(self.model, self.kv_cache, backend, ForkingSampler(sampler, config.max_num_seqs),
                                  self.device, self._make_graphs(backend),
                                  None if self.cascade_rule is None else CascadePlanner(self.cascade_rule),
                                  self._logits_sizes())
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.counters = EngineCounters()
        self._in_flight: InFlightStep | None = None  # async scheduling: the step whose draws are still on the GPU
        self._grammars: Grammars | None = None  # structured outputs: made at the first constrained request
        self._compiling: list[Request] = []  # constrained requests whose grammar is still compiling, in order
        self.stop_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.stop_token_ids.add(self.tokenizer.eos_token_id)
        # SamplingParams fields the checkpoint's generation_config.json sets (vLLM's generation_config="auto")
        self.default_sampling_overrides = generation_defaults(config.model, config.generation_config)
        self.metrics = EngineMetrics()  # vLLM's per-request histograms (time to first token, ...)
        self._step_time = time.time()  # wall time at the start of the current step (request timings)
        logger.info("engine ready: %s on %s (%s), %d KV pages of %d tokens, max_model_len %d",
                    config.model, self.device, self.dtype, self.pool.num_pages, config.block_size,
                    self.max_model_len)

    # ----------------------------------------------------------------------------- set-up
    def _make_kv_cache(self, sampler: Sampler) -> KVCache:
        mc, cfg = self.model_config, self.config
        page_bytes = KVCache.bytes_per_page(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.block_size, self.dtype)
        if cfg.num_gpu_blocks_override is not None:
            num_pages = cfg.num_gpu_blocks_override
        elif cfg.kv_cache_memory_bytes is not None:
            num_pages = cfg.kv_cache_memory_bytes // page_bytes
        elif self.device.type == "cuda":
            num_pages = self._pool_bytes_left(sampler) // page_bytes - 1  # less the scratch page
        else:
            num_pages = DEFAULT_CPU_KV_CACHE_BYTES // page_bytes
        if num_pages * cfg.block_size < self.max_model_len:
            raise ValueError(
                f"the KV pool ({num_pages} pages of {cfg.block_size} tokens) cannot hold one sequence of "
                f"max_model_len={self.max_model_len} tokens: lower max_model_len or give the pool more pages")
        return KVCache(num_pages, cfg.block_size, mc.num_layers, mc.num_kv_heads, mc.head_dim,
                       self.dtype, self.device)

    def _pool_bytes_left(self, sampler: Sampler) -> int:
        """What gpu_memory_utilization leaves for the pool once the largest step's measured peak
        and the decode graphs' memory are set aside (engine/memory.py)."""
        mc, cfg = self.model_config, self.config
        steps = self.step_memory = profile_step_memory(self.model, sampler, cfg.max_num_batched_tokens,
                                                       cfg.max_num_seqs, cfg.max_logprobs, self.max_model_len,
                                                       self._max_pages_per_seq, self.device)
        graphs = 0
        if self._uses_graphs():
            graphs = steps.graph_peak + DecodeGraphs.reserved_bytes(cfg.max_num_seqs, self._max_pages_per_seq,
                                                                    self._max_levels, mc.num_heads, mc.head_dim)
        return kv_pool_bytes(self.device, cfg.gpu_memory_utilization, steps.eager_peak, graphs)

    def _make_backend(self) -> AttentionBackend:
        """FlashInfer on a GPU, the pure-torch reference elsewhere (or when asked for)."""
        choice = self.config.attention_backend
        if choice == "auto":
            choice = "flashinfer" if self.device.type == "cuda" else "reference"
        if choice == "reference":
            return ReferenceBackend()
        if self.device.type != "cuda":
            raise ValueError(f"attention_backend={choice!r} needs a CUDA device, got {self.device}")
        mc = self.model_config
        return FlashInferBackend(mc.num_heads, mc.num_kv_heads, mc.head_dim, self.dtype, self.device,
                                 self._max_levels)

    def _make_graphs(self, backend: AttentionBackend) -> DecodeGraphs | None:
        if not self._uses_graphs():
            return None
        assert isinstance(backend, FlashInferBackend)
        return DecodeGraphs(self.model, self.kv_cache, backend, self.config.max_num_seqs, self._max_pages_per_seq,
                            self.device, self._max_levels)

    def _logits_sizes(self) -> list[int] | None:
        """Row counts logits are computed for on a GPU (runner.py): the decode graphs' sizes, whose
        padded hidden states then serve as they are."""
        return graph_batch_sizes(self.config.max_num_seqs) if self.device.type == "cuda" else None

    @property
    def _max_levels(self) -> int:
        """Shared-prefix levels a step attends to at most (0 with cascade attention off)."""
        return self.cascade_rule.max_levels if self.cascade_rule is not None else 0

    @property
    def _max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.config.block_size)

    def _uses_graphs(self) -> bool:
        """Decode steps replay CUDA graphs with FlashInfer on a GPU, unless enforce_eager."""
        return not self.config.enforce_eager and self.device.type == "cuda" and \
            self.config.attention_backend != "reference"

    # ----------------------------------------------------------------------------- requests
    def make_prompt(self, prompt: object, label: str, truncate_prompt_tokens: int | None = None) -> PromptInput:
        """Validate one prompt (text, or vLLM's TextPrompt / TokensPrompt dict) and tokenize it;
        with truncate_prompt_tokens k, keep its last k tokens (-1: max_model_len), as vLLM does."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{label}: text prompts need a tokenizer (skip_tokenizer_init is set)")
            if not prompt:
                raise ValueError(f"{label}: prompt is empty")
            if not is_valid_text(prompt):
                raise ValueError(f"{label}: prompt is not valid Unicode (it holds a lone surrogate)")
            return self._check_tokens(self.tokenizer(prompt).input_ids, label, prompt, truncate_prompt_tokens)
        if isinstance(prompt, dict):
            _check_prompt_keys(prompt, label)
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not _all_ints(ids):
                    raise ValueError(f"{label}: prompt_token_ids must be a list of ints")
                return self._check_tokens(list(ids), label, prompt.get("prompt"), truncate_prompt_tokens)
            if "prompt" in prompt:
                return self.make_prompt(prompt["prompt"], label, truncate_prompt_tokens)
        raise ValueError(f"{label}: a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")

    def _check_tokens(self, ids: list[int], label: str, text: str | None,
                      truncate_prompt_tokens: int | None = None) -> PromptInput:
        if not ids:
            raise ValueError(f"{label}: prompt is empty")
        if truncate_prompt_tokens is not None:
            keep = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
            if keep < len(ids):
                ids, text = ids[-keep:], None  # the text no longer matches the tokens
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise ValueError(f"{label}: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{label}: prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                             "(at least one token must be left to generate)")
        return PromptInput(ids, text)

    def check_params(self, params: object, label: str) -> SamplingParams:
        """The checks that need the model: logprob counts against max_logprobs, token ids against
        the vocabulary, widths against max_n."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{label}: sampling params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model_config.vocab_size
        limit = vocab if self.config.max_logprobs == ALL_LOGPROBS else self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and (vocab if value == ALL_LOGPROBS else value) > limit:
                raise ValueError(f"{label}: {name}={value} exceeds max_logprobs={self.config.max_logprobs} "
                                 "(raise the engine's max_logprobs, -1 for the whole vocabulary)")
        checked = (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids or ()),
                   ("logit_bias", params.logit_bias or ()))
        for name, ids in checked:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{label}: invalid SamplingParams: {name} holds token id(s) {bad[:8]} outside "
                                 f"the vocabulary [0, {vocab})")
        if params.bad_words and self.tokenizer is None:
            raise ValueError(f"{label}: bad_words needs a tokenizer (skip_tokenizer_init is set)")
        for name in ("n", "best_of"):
            self.check_width(getattr(params, name), name, label)
        if params.structured_outputs is not None:
            try:
                self.grammars.check(params.structured_outputs)
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
        return params

    @property
    def grammars(self) -> Grammars:
        """The structured-output grammars (xgrammar over the tokenizer's vocabulary, padded to the model's)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("invalid StructuredOutputsParams: structured outputs need a tokenizer "
                                 "(skip_tokenizer_init is set)")
            try:
                self._grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.stop_token_ids,
                                          self.device.type == "cuda")
            except ImportError as err:
                raise ValueError(f"invalid StructuredOutputsParams: {err}") from None
        return self._grammars
    def check_fits(self, prompt: PromptInput, params: SamplingParams, label: str) -> None:
        """max_tokens must fit beside the prompt in max_model_len (vLLM refuses it with a 400)."""
        if params.max_tokens is not None and len(prompt.token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"{label}: invalid SamplingParams: max_tokens={params.max_tokens} is too large: this "
                             f"model's maximum context length (max_model_len) is {self.max_model_len} tokens and the "
                             f"prompt has {len(prompt.token_ids)}, so at most "
                             f"{self.max_model_len - len(prompt.token_ids)} tokens can be generated")

    def get_tokenizer(self):
        """The engine's tokenizer (vLLM's `LLMEngine.get_tokenizer`)."""
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Drop every cached page no sequence holds (vLLM's reset_prefix_cache); True when none is left."""
        self.tree.evict(self.tree.num_evictable_pages)
        return self.tree.num_evictable_pages == 0

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad words: each word as it starts a text, and with a leading space
        when that tokenizes to a different first token in the same number of tokens."""
        sequences: list[list[int]] = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            sequences.append(plain)
            if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        return [ids for ids in sequences if ids]

    def check_width(self, value: int | None, name: str, label: str) -> None:
        """Samples, beams and fork widths are capped by max_n (each one is a sequence to run)."""
        if value is not None and value > self.config.max_n:
            raise ValueError(f"{label}: {name}={value} exceeds max_n={self.config.max_n}")

    def add_request(self, request_id: str, prompt: PromptInput | str | dict, params: SamplingParams) -> Request:
        """Enqueue a request: one sequence, which forks into the samples at its first draw. A prompt
        not yet validated (text or a prompt dict, as vLLM's `LLMEngine.add_request` takes) is
        validated here, with its params."""
        if not isinstance(prompt, PromptInput):
            label = f"request {request_id}"
            prompt = self.make_prompt(prompt, label, self.check_params(params, label).truncate_prompt_tokens)
        return self.add_requests([(request_id, prompt, params)])[0]

    def add_requests(self, batch: Seq[tuple[str, PromptInput, SamplingParams]]) -> list[Request]:
        """Enqueue validated requests as one batch: the planner orders them so that every prefix
        they share is prefilled once (planner.py). Nothing is queued if an id is taken."""
        seen: set[str] = set()
        for request_id, prompt, params in batch:
            if request_id in self.requests or request_id in seen:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.check_fits(prompt, params, f"request {request_id}")
            seen.add(request_id)
        requests = [self.new_request(request_id, prompt, params, max(params.n, params.best_of or 1))
                    for request_id, prompt, params in batch]
        ready = []
        for request in requests:
            self.requests[request.request_id] = request
            spec = request.params.structured_outputs
            if spec is None:
                ready.append(request)
                continue
            request.grammar = self.grammars.submit(spec)
            (self._compiling if not request.grammar.done() else ready).append(request)
        self._enqueue(ready)
        return requests

    def _enqueue(self, requests: list[Request]) -> None:
        """Queue requests as one planned batch, each constrained one at the start of its grammar."""
        for request in requests:
            if request.grammar is not None:
                request.seqs[0].grammar = GrammarState.start(request.grammar)
        self.scheduler.add_batch([request.seqs[0] for request in requests])

    def _admit_compiled(self) -> list[RequestOutput]:
        """Queue the waiting requests whose grammars have compiled, as one batch; if nothing else
        can run meanwhile, wait for the first compile rather than spin. A grammar that failed to
        compile ends its request with finish_reason "abort" (its error logged); the rest run."""
        if not self.scheduler.has_work() and self._in_flight is None:
            wait([request.grammar for request in self._compiling], return_when=FIRST_COMPLETED)
        done = [request for request in self._compiling if request.grammar.done()]
        if not done:
            return []
        self._compiling = [request for request in self._compiling if not request.grammar.done()]
        failed = [request for request in done if request.grammar.exception() is not None]
        for request in failed:
            logger.error("request %s: its grammar failed to compile: %s", request.request_id,
                         request.grammar.exception())
            self._drop_uncompiled(request)
        self._enqueue([request for request in done if request.grammar.exception() is None])
        return self._finished_outputs([request.seqs[0] for request in failed])

    @staticmethod
    def _drop_uncompiled(request: Request) -> None:
        """End a request that never reached the scheduler (its grammar did not compile, or it was aborted)."""
        seq = request.seqs[0]
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"

    def new_request(self, request_id: str, prompt: PromptInput, params: SamplingParams, num_samples: int = 1,
                    hold: bool = False) -> Request:
        """A request with its first sequence, not queued.

        With hold, that sequence starts as a held one with nothing computed: a search root, which
        runs when probed or forked.
        """
        bad_words = self.bad_words_token_ids(params.bad_words) if params.bad_words else []
        request = Request(request_id, prompt.text, prompt.token_ids, params, num_samples=num_samples, hold=hold,
                          bad_words_token_ids=bad_words)
        request.metrics = RequestMetrics(arrival_time=time.time())
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
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
        same = request is None or request is parent.request
        request = parent.request if request is None else request
        children = []
        for _ in range(k):
            index = len(request.seqs)
            child = Sequence(next(self._seq_ids), request, index, list(parent.token_ids),
                             parent.num_prompt_tokens if same else len(parent.token_ids), request.sample_seed(index))
            if same:
                child.cumulative_logprob = parent.cumulative_logprob
                child.logprobs = None if parent.logprobs is None else list(parent.logprobs)
            elif request.params.logprobs is not None:
                child.logprobs = []
            child.grammar = self._child_grammar(parent, request)
            request.seqs.append(child)
            children.append(child)
        fork_kv(self.scheduler, parent, children)
        for child in children:
            if parent.status is SequenceStatus.RUNNING and child.kv is not None:
                child.status = SequenceStatus.RUNNING
                self.scheduler.running.append(child)
            else:
                self.scheduler.add(child)
        return children

    def _child_grammar(self, parent: Sequence, request: Request) -> GrammarState | None:
        """A fork continues its parent's grammar position when it keeps the parent's constraint
        (samples, and tree-search forks with the same structured_outputs); a fork under another
        constraint starts that one afresh (compiled now if needed)."""
        spec = request.params.structured_outputs
        if spec is None:
            return None
        if parent.grammar is not None and parent.request.params.structured_outputs == spec:
            return parent.grammar.fork()
        if request.grammar is None:
            self.grammars.check(spec)
            request.grammar = self.grammars.submit(spec)
        return GrammarState.start(request.grammar)

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
        if request in self._compiling:
            self._compiling.remove(request)
            self._drop_uncompiled(request)
        elif request is not None:
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self.scheduler.abort(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def peek_output(self, request_id: str) -> RequestOutput | None:
        """A snapshot of an unfinished request: each sample's tokens, text and logprobs so far.

        `step` returns a request's output only once it has finished; this is how a caller sees
        progress before that (a streaming server diffs consecutive snapshots). `finished` is
        False; a sample that has already ended has its finish_reason and final text. The lists
        are copies, safe to hand to another thread. Call it between steps, on the thread that
        steps the engine. None when the id is unknown or its final output was already returned.
        """
        request = self.requests.get(request_id)
        if request is None:
            return None
        output = self.make_output(request)
        for completion in output.outputs:
            if completion.logprobs is not None:
                completion.logprobs = list(completion.logprobs)
        return output

    # ----------------------------------------------------------------------------- stepping
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the outputs of requests that finished in it (or, with async
        scheduling, in the step before it, whose tokens are read once this one is queued)."""
        finished = self._admit_compiled() if self._compiling else []
        return finished + self._step()

    def _step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self._step_time = now = time.time()
        for item in batch:
            metrics = item.seq.request.metrics
            if metrics is not None and metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        if self.runner.cascade is not None and len(batch) > 1:
            # Sequences under one tree node adjacent: each shared group is one attention request
            # (two in a step that also prefills, where its decoding members come first).
            batch = [batch[i] for i in self.runner.cascade.order([item.seq.kv.node for item in batch])]
        if any(item.num_new_tokens != 1 for item in batch):
            # Single-token rows first (a stable sort): the GPU backend runs them through its decode
            # kernel, as one run of rows, and only the others through the prefill kernel.
            batch = sorted(batch, key=lambda item: item.num_new_tokens != 1)
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
        self.metrics.iteration_tokens.observe(sum(item.num_new_tokens for item in batch))
        if overlap:
            previous = self._in_flight
            rows = [self._sampling_row(seq, seq.seed) for seq in samplers]
            bitmask = None
            if self._grammars is not None and any(seq.grammar is not None for seq in samplers):
                def bitmask() -> TokenBitmask | None:
                    return self._launched_bitmask(samplers, previous)
            launched = self.runner.launch(batch, rows, previous.launched if previous else None, bitmask)
            self._advance(batch)
            max_model_len = self.max_model_len
            for row, seq in enumerate(samplers):
                seq.token_ids.append(PLACEHOLDER)
                seq.num_pending += 1
                seq.pending_row = row
                seq.final_in_flight = _reaches_length(len(seq.token_ids), seq, max_model_len)
            self._in_flight = InFlightStep(samplers, launched)
            return finished + (self._resolve(previous) if previous else [])
        draws = [self._draw_request(seq) for seq in samplers]
        result: StepDraws | None = self.runner.execute(batch, draws, self._token_bitmask(samplers, draws))
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
            if self._took_token(seq, result, row):
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
                if request.metrics is not None:
                    request.metrics.finished_time = time.time()
                output = self.make_output(request)
                self.metrics.record_finished(output, request.params)
                finished.append(output)
        return finished

    @property
    def pages_in_use(self) -> int:
        """Pages held by sequences, held branches or pins: all but the free and the idle cached ones."""
        return self.pool.num_pages - self.pool.num_free - self.tree.num_evictable_pages

    def _draw_request(self, seq: Sequence) -> DrawRequest:
        """One row for seq's own draw plus one per sample it forks into here, or a beam probe."""
        if seq.probe_k:
            return DrawRequest(top_k=seq.probe_k)
        request = seq.request
        seeds = [seq.seed] + [request.sample_seed(i) for i in request.pending_forks(seq)]
        return DrawRequest([self._sampling_row(seq, seed) for seed in seeds])

    def _launched_bitmask(self, samplers: list[Sequence], previous: InFlightStep | None) -> TokenBitmask | None:
        """The token mask of a step queued ahead (async scheduling), one row per sequence, filled
        while the GPU runs its forward: a constrained sequence whose newest token the previous
        step draws waits for that step's tokens (done before this forward is) and takes its token
        early. Rows whose grammar is complete (their token will be dropped) draw freely."""
        constrained = [(row, seq) for row, seq in enumerate(samplers) if seq.grammar is not None]
        if previous is not None and any(seq.num_pending for _, seq in constrained):
            tokens = previous.launched.result().token_ids
            for _, seq in constrained:
                if seq.num_pending:
                    seq.grammar.accept_early(tokens[seq.pending_row])
        rows = [row for row, seq in constrained if seq.grammar.open]
        if not rows:
            return None
        words = self.grammars.bitmask(len(samplers))
        self.grammars.fill_bitmask([samplers[row].grammar for row in rows], words, rows)
        return TokenBitmask(words, rows)

    def _token_bitmask(self, samplers: list[Sequence], draws: list[DrawRequest]) -> TokenBitmask | None:
        """The allowed tokens of the step's constrained draw rows (None, and no work, without any),
        for a step that waits for its draws (its sequences' tokens are all known); a sequence
        that forks here gives each of its draw rows its own mask."""
        constrained = [i for i, seq in enumerate(samplers) if seq.grammar is not None and draws[i].rows]
        if not constrained:
            return None
        first_row = list(itertools.accumulate((len(d.rows) for d in draws), initial=0))
        words = self.grammars.bitmask(first_row[-1])
        self.grammars.fill_bitmask([samplers[i].grammar for i in constrained], words,
                                   [first_row[i] for i in constrained])
        rows = []
        for i in constrained:
            start, stop = first_row[i], first_row[i + 1]
            words[start + 1:stop] = words[start]
            rows.extend(range(start, stop))
        return TokenBitmask(words, rows)

    def _sampling_row(self, seq: Sequence, seed: int | None) -> SamplingRow:
        params, bad_words = seq.request.params, seq.request.bad_words_token_ids
        if seq.num_output_tokens < params.min_tokens:
            blocked = sorted(self.stop_token_ids | set(params.stop_token_ids))
            return SamplingRow(params, seed, seq.token_ids, seq.num_prompt_tokens, blocked, bad_words)
        if seed != seq.seed:
            return SamplingRow(params, seed, seq.token_ids, seq.num_prompt_tokens, (), bad_words)
        # A row reads the sequence's tokens when drawn, so its own row serves every step.
        if seq.sampling_row is None:
            seq.sampling_row = SamplingRow(params, seed, seq.token_ids, seq.num_prompt_tokens, (), bad_words)
        return seq.sampling_row

    def _append_token(self, seq: Sequence, result: SamplerOutput, row: int) -> None:
        seq.token_ids.append(result.token_ids[row])
        self._took_token(seq, result, row)

    def _took_token(self, seq: Sequence, result: SamplerOutput, row: int) -> bool:
        """Account for seq's newest known token (draws still pending after it do not count); True if it ends seq."""
        token = result.token_ids[row]
        seq.cumulative_logprob += result.logprobs[row]
        self.metrics.generation_tokens += 1
        metrics = seq.request.metrics
        if metrics is not None:
            if metrics.first_token_time is None:
                metrics.first_token_time = self._step_time
            metrics.last_token_time = self._step_time
            metrics.num_generation_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(token, result, row, seq.request.params))
        reason, stop = self._stop_reason(seq, token, seq.request.params)
        grammar = seq.grammar
        if grammar is not None:
            if not grammar.accept(token):  # the mask allowed only what the grammar accepts: a bug
                logger.error("request %s: sampled token %d that its grammar rejects; ending it",
                             seq.request.request_id, token)
                reason, stop = "abort", None
            elif reason is None and grammar.terminated:  # complete, and its stop token drawn (ignore_eos)
                reason = "stop"
        if reason is None:
            return False
        seq.finish_reason, seq.stop_reason = reason, stop
        self.scheduler.finish(seq, hold=seq.request.hold)
        return True

    def _logprob_entry(self, token: int, result: SamplerOutput, row: int, params: SamplingParams) -> dict[int, Logprob]:
        return self._logprob_dict(token, result.logprobs[row], result.ranks[row], result.top_logprobs[row] or (),
                                  params)

    def _logprob_dict(self, token: int, logprob: float, rank: int, top: Seq[tuple[int, float]],
                      params: SamplingParams) -> dict[int, Logprob]:
        """vLLM's logprobs entry: the chosen (or actual prompt) token, then the top ones by rank."""
        entry = {token: Logprob(logprob, rank, self._decode_one(token, params))}
        for top_rank, (tid, lp) in enumerate(top, start=1):
            if tid not in entry:
                entry[tid] = Logprob(lp, top_rank, self._decode_one(tid, params))
        return entry

    def _decode_one(self, token: int, params: SamplingParams | None = None) -> str | None:
        if self.tokenizer is None or (params is not None and not params.detokenize):
            return None
        return self.tokenizer.decode([token])

    def _decode(self, token_ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens,
                                     spaces_between_special_tokens=params.spaces_between_special_tokens)

    def _stop_reason(self, seq: Sequence, token: int, params: SamplingParams) -> tuple[str | None, int | str | None]:
        """vLLM's order: stop token ids, EOS, stop strings, then length limits (of the known tokens)."""
        known = len(seq.token_ids) - seq.num_pending
        if known - seq.num_prompt_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return "stop", token
            if not params.ignore_eos and token in self.stop_token_ids:
                return "stop", None
            if params.stop and self.tokenizer is not None:
                hit = self._find_stop_string(seq, params)
                if hit is not None:
                    return "stop", hit
        if _reaches_length(known, seq, self.max_model_len):
            return "length", None
        return None, None

    def _find_stop_string(self, seq: Sequence, params: SamplingParams) -> str | None:
        """Decode the output so far; cut the text at the earliest stop string that appeared."""
        text = self._decode(seq.output_token_ids, params)
        # Only the newly decoded tail (plus room for a stop string straddling it) can hold a new hit.
        search_from = max(0, len(seq.text) - max(len(s) for s in params.stop) + 1)
        seq.text = text
        best: tuple[int, str] | None = None
        for stop in params.stop:
            at = text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        seq.text = text[:at + len(stop)] if params.include_stop_str_in_output else text[:at]
        return stop

    def stats(self) -> dict[str, int | float]:
        """Totals since start: what was computed, what the prefix tree saved, pages in use.

        prompt_tokens counts each request's prompt once (its samples share it);
        prefill_tokens_computed is what the model actually ran other than decodes, so with
        forks and prefix reuse it is far below prompt_tokens x n. Pages in use are those held
        by sequences, held search branches and pins (idle cache excluded); see
        `pages_in_use_series` for the per-step history. kv_pages_read is the KV pages one layer's
        attention read, summed over steps, against kv_pages_listed, what plain attention would
        read (each sequence its whole table): shared-prefix attention's saving, in
        cascade_steps steps.
        """
        c, planner = self.counters, self.scheduler.planner
        return dict(prompt_tokens=c.prompt_tokens, unique_prompt_tokens=planner.unique_prompt_tokens,
                    prefill_tokens_computed=c.prefill_tokens, decode_tokens=c.decode_tokens,
                    peak_pages_in_use=c.peak_pages, pages_in_use=self.pages_in_use, steps=c.steps,
                    preemptions=self.scheduler.num_preemptions, pins_dropped=planner.pins_dropped,
                    kv_pages=self.pool.num_pages, cascade_steps=self.runner.cascade_steps,
                    kv_pages_read=self.runner.kv_pages_read, kv_pages_listed=self.runner.kv_pages_listed)

    def pages_in_use_series(self) -> list[int]:
        """Pages in use at the start of each of the last (up to 65,536) steps, oldest first."""
        return list(self.counters.pages_series)

    # ----------------------------------------------------------------------------- outputs
    def make_output(self, request: Request) -> RequestOutput:
        """n completions by sample index; with best_of > n, the n of highest cumulative logprob, best first.

        Samples not forked yet (the prompt is still prefilling) show as empty completions.
        """
        params = request.params
        completions = [self._completion(seq) for seq in request.seqs]
        if request.num_samples > params.n:
            order = sorted(range(len(request.seqs)), key=lambda i: -request.seqs[i].cumulative_logprob)
            completions = [completions[i] for i in order[:params.n]]
            for rank, completion in enumerate(completions):
                completion.index = rank
        completions += [CompletionOutput(index=i, text="", token_ids=[], cumulative_logprob=None,
                                         logprobs=None if params.logprobs is None else [])
                        for i in range(len(completions), params.n)]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=self._prompt_logprobs(request),
            outputs=completions,
            finished=request.is_finished,
            num_cached_tokens=request.num_cached_tokens or 0,
            metrics=None if request.metrics is None else dataclasses.replace(request.metrics),
        )

    def _prompt_logprobs(self, request: Request) -> list[dict[int, Logprob] | None] | None:
        """vLLM's prompt_logprobs: None for the first token, then per token its entry (computed
        in the prefill pass, runner.py)."""
        if request.prompt_logprobs is None:
            return None
        params = request.params
        return [None] + [self._logprob_dict(token, lp, rank, top, params)
                         for token, (lp, rank, top) in zip(request.prompt_token_ids[1:], request.prompt_logprobs[1:])]

    def _completion(self, seq: Sequence) -> CompletionOutput:
        params = seq.request.params
        if seq.stop_reason is not None and isinstance(seq.stop_reason, str):
            text = seq.text  # already cut at the stop string
        elif self.tokenizer is not None and params.detokenize:
            text = self._decode(seq.output_token_ids, params)
        else:
            text = ""
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )


@dataclass
class EngineCounters:
    prompt_tokens: int = 0
    prefill_tokens: int = 0  # tokens computed other than one-token decodes (recomputation included)
    decode_tokens: int = 0
    peak_pages: int = 0
    steps: int = 0
    pages_series: deque[int] = field(default_factory=lambda: deque(maxlen=1 << 16))
    # (time.perf_counter() at the step's start, decode rows, prefill tokens) of the last steps:
    # where a batch's time went (see summary.step_breakdown)
    step_series: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=1 << 16))

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
        self.step_series.append((time.perf_counter(), decodes, prefills))


def _all_ints(ids: list | tuple) -> bool:
    """Every element an int and none a bool. Checked by type in C first: a batch of long prompts
    (millions of ids) is validated before the first step, while the GPU waits."""
    if set(map(type, ids)) <= {int}:
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


def _reaches_length(num_tokens: int, seq: Sequence, max_model_len: int) -> bool:
    """With num_tokens tokens (prompt included), seq reaches max_tokens or max_model_len."""
    max_tokens = seq.request.params.max_tokens
    return (max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens) or num_tokens >= max_model_len


_PROMPT_KEYS = {"prompt", "prompt_token_ids", "token_type_ids", "multi_modal_data", "mm_processor_kwargs", "cache_salt"}


def _check_prompt_keys(prompt: dict, label: str) -> None:
    """vLLM's TextPrompt / TokensPrompt keys: the text-model ones taken, the others refused by name."""
    unknown = sorted(set(prompt) - _PROMPT_KEYS)
    if unknown:
        raise ValueError(f"{label}: unknown prompt key(s) {unknown}; expected 'prompt' or 'prompt_token_ids'")
    if prompt.get("multi_modal_data") is not None or prompt.get("mm_processor_kwargs"):
        raise ValueError(f"{label}: multi_modal_data is not supported: forkserve runs text-only models")
    if prompt.get("cache_salt") is not None:
        raise ValueError(f"{label}: cache_salt is not supported yet: every request shares the prefix cache; "
                         "run isolated tenants on separate engines")


def _check_local_model(model: str) -> None:
    """forkserve loads local checkpoint directories only: a hub id ("org/name", no such directory)
    gets told how to get one."""
    from pathlib import Path

    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_hub_id and not Path(model).exists():
        raise ValueError(f"model {model!r} is not a local directory: forkserve loads local checkpoints only and "
                         "downloads nothing; download it first (e.g. `huggingface-cli download "
                         f"{model} --local-dir DIR`) and pass DIR")


def _load_tokenizer(path: str):
    """The checkpoint's own tokenizer files; never remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {path} (tokenizer.json or tokenizer_config.json with its "
                         f"vocabulary files expected there; pass skip_tokenizer_init=True to run on token ids): "
                         f"{error}") from error
