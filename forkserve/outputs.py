"""Result types, shaped as vLLM's so that code reading vLLM outputs reads these unchanged."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    lora_request: None = None  # vLLM's field; forkserve has no adapters

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """vLLM's per-request timings (time.time() seconds); None where the moment has not come yet."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_generation_tokens: int = 0

    @property
    def time_in_queue(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    # prompt_logprobs: per prompt token, None for the first, then {token: Logprob} holding the
    # actual token and the top prompt_logprobs tokens (vLLM's shape)
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    metrics: RequestMetrics | None = None
    lora_request: None = None
    encoder_prompt: None = None
    encoder_prompt_token_ids: None = None


@dataclass
class BeamSearchSequence:
    """One finished hypothesis; `tokens` include the prompt, as vLLM's do, and `text` decodes them."""

    tokens: list[int]
    cum_logprob: float  # summed raw log-probabilities of the generated tokens
    text: str | None = None
    score: float = 0.0  # cum_logprob / generated_len ** length_penalty: what ranks hypotheses
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    """Per prompt: beam_width hypotheses, best first."""

    sequences: list[BeamSearchSequence]
