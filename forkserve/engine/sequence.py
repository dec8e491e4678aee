"""Requests and the sequences they generate."""
from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from forkserve.detokenizer import IncrementalDetokenizer
from forkserve.engine.tree import SeqKV
from forkserve.outputs import Logprob, RequestMetrics
from forkserve.worker.plan import SamplingRow
from forkserve.sampling_params import SamplingParams
from forkserve.structured.matcher import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generated continuation: its tokens, how far their KV is computed, and its KV handle."""

    seq_id: int
    request: "Request"
    index: int  # sample index within the request
    token_ids: list[int]
    num_prompt_tokens: int
    seed: int | None
    num_computed_tokens: int = 0
    kv: SeqKV | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""  # set while checking stop strings (cut at the one found)
    detokenizer: IncrementalDetokenizer | None = None  # its output's text, token by token (output_processor.py)
    num_preemptions: int = 0
    arrival_step: int = 0  # scheduler step at which it was queued (for the waiting order's ageing)
    probe_k: int = 0  # beam probe: at its next draw, report the k best tokens instead of sampling
    candidates: list[tuple[int, float]] | None = None  # a finished probe's (token, logprob), best first
    # Async scheduling: trailing PLACEHOLDER tokens whose draws are still on the GPU, the row of
    # the newest one in its step, and whether that draw is this sequence's last by length.
    num_pending: int = 0
    pending_row: int = -1
    final_in_flight: bool = False
    sampling_row: SamplingRow | None = None  # its draws' row once past min_tokens (Engine._sampling_row)
    grammar: GrammarState | None = None  # structured outputs: its position in the request's grammar

    @property
    def output_token_ids(self) -> list[int]:
        """Output tokens known on the host (draws still on the GPU left out)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    @property
    def num_output_tokens(self) -> int:
        """Output tokens drawn so far, pending ones included."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_tokens_at_once(self) -> bool:
        """Its next draw feeds a host decision, so its step cannot be queued ahead (async scheduling):
        a first draw that forks into samples, a beam probe, or a request that needs every token
        on the host. Once forked, samples draw like any other sequence."""
        request = self.request
        return request.needs_tokens_at_once or bool(self.probe_k) or \
            (self.index == 0 and len(request.seqs) < request.num_samples)


@dataclass(eq=False)
class Request:
    """A prompt with its sampling parameters; it finishes when all its sequences have.

    It starts as one sequence that prefills the prompt; at that sequence's first draw it forks
    into `num_samples` (n, or best_of when larger), so the prompt is computed once.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission, as vLLM reports it
    num_samples: int = 1
    hold: bool = False  # finished sequences keep their KV (tree search: they are forked later)
    grammar: Future | None = None  # structured outputs: the compiled grammar (Grammars.submit)
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # params.bad_words, tokenized
    metrics: RequestMetrics | None = None
    # With params.prompt_logprobs: per prompt token so far, (logprob, rank, top [(token, logprob)]),
    # None for the first token; filled by the prefill steps (the worker computes them)
    prompt_logprobs: list[tuple[float, int, list[tuple[int, float]]] | None] | None = None
    # Its draws feed the host's next decision (penalties, search): no async scheduling. Fixed at
    # creation (its params are), and read for every sampling row of every step.
    needs_tokens_at_once: bool = field(init=False)

    def __post_init__(self) -> None:
        p = self.params
        self.needs_tokens_at_once = self.hold or p.repetition_penalty != 1.0 or bool(p.frequency_penalty) \
            or bool(p.presence_penalty) or any(len(word) > 1 for word in self.bad_words_token_ids)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @classmethod
    def start(cls, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
              seq_id: int, num_samples: int, hold: bool, bad_words_token_ids: list[list[int]]) -> Request:
        """A request with its first sequence (with hold, a held one with nothing computed)."""
        request = cls(request_id, prompt, prompt_token_ids, params, num_samples=num_samples, hold=hold,
                      bad_words_token_ids=bad_words_token_ids, metrics=RequestMetrics(arrival_time=time.time()),
                      prompt_logprobs=None if params.prompt_logprobs is None else [None])
        seq = Sequence(seq_id, request, 0, list(prompt_token_ids), len(prompt_token_ids), request.sample_seed(0),
                       logprobs=[] if params.logprobs is not None else None)
        if hold:
            seq.status = SequenceStatus.FINISHED
        request.seqs.append(seq)
        return request

    def sample_seed(self, index: int) -> int | None:
        """Sample i draws from seed `params.seed + i`: exactly what a request with that seed draws."""
        return None if self.params.seed is None else self.params.seed + index

    def pending_forks(self, seq: Sequence) -> range:
        """Sample indices that `seq` forks into at this draw (only the first sample, only once)."""
        return range(len(self.seqs), self.num_samples) if seq.index == 0 else range(0)
