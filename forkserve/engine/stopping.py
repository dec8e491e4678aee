"""A sequence's newest token accounted for (logprobs, timings, grammar), and whether it stops the
sequence: stop token ids, EOS, stop strings (on the new text only), length limits."""
from __future__ import annotations

import logging
import time

from forkserve.engine.output_processor import OutputProcessor
from forkserve.engine.request_metrics import EngineMetrics
from forkserve.engine.scheduler import ScheduledSeq, Scheduler
from forkserve.engine.sequence import Sequence
from forkserve.worker.plan import SamplerOutput

logger = logging.getLogger(__name__)


class StopChecker:
    """Takes each new token of a sequence: its logprobs, then vLLM's stop conditions (a stopped
    sequence is finished in the scheduler)."""

    def __init__(self, stop_token_ids: set[int], max_model_len: int, outputs: OutputProcessor,
                 scheduler: Scheduler, metrics: EngineMetrics) -> None:
        self.stop_token_ids = stop_token_ids  # the model's EOS ids (and the tokenizer's)
        self.max_model_len = max_model_len
        self.outputs = outputs
        self.scheduler = scheduler
        self.metrics = metrics
        self.step_time = time.time()  # wall time at the start of the current step (request timings)

    def start_step(self, batch: list[ScheduledSeq]) -> None:
        """A step begins: its time stamps the tokens it draws, and requests scheduled the first time."""
        self.step_time = now = time.time()
        for item in batch:
            metrics = item.seq.request.metrics
            if metrics is not None and metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now

    def took_token(self, seq: Sequence, result: SamplerOutput, row: int) -> bool:
        """Account for seq's newest known token (draws still pending after it do not count): its
        logprobs, timings, grammar position; True if it ends seq."""
        token = result.token_ids[row]
        seq.cumulative_logprob += result.logprobs[row]
        self.metrics.generation_tokens += 1
        metrics = seq.request.metrics
        if metrics is not None:
            if metrics.first_token_time is None:
                metrics.first_token_time = self.step_time
            metrics.last_token_time = self.step_time
            metrics.num_generation_tokens += 1
        if seq.logprobs is not None:
            seq.logprobs.append(self.outputs.logprob_entry(token, result, row, seq.request.params))
        reason, stop = self.reason(seq, token)
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

    def reason(self, seq: Sequence, token: int) -> tuple[str | None, int | str | None]:
        """vLLM's order: stop token ids, EOS, stop strings, then length limits (of the known tokens)."""
        params = seq.request.params
        known = len(seq.token_ids) - seq.num_pending
        if known - seq.num_prompt_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return "stop", token
            if not params.ignore_eos and token in self.stop_token_ids:
                return "stop", None
            if params.stop and self.outputs.tokenizer is not None:
                hit = self.outputs.find_stop_string(seq, params)
                if hit is not None:
                    return "stop", hit
        if reaches_length(known, seq, self.max_model_len):
            return "length", None
        return None, None


def reaches_length(num_tokens: int, seq: Sequence, max_model_len: int) -> bool:
    """With num_tokens tokens (prompt included), seq reaches max_tokens or max_model_len."""
    max_tokens = seq.request.params.max_tokens
    return (max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens) or num_tokens >= max_model_len
