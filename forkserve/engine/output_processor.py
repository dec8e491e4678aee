"""Tokens out: text and `RequestOutput`s from what the core generated, built incrementally.

Each sequence's text is kept by an `IncrementalDetokenizer`, so a token is decoded once however
often its request is looked at: stop strings are searched in the new text only, and a streaming
snapshot (`snapshot`) costs what the new tokens cost, not what the whole output does. A
request's final text is decoded once, in full, when it finishes (the text vLLM returns).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence as Seq

from forkserve.detokenizer import IncrementalDetokenizer
from forkserve.engine.sequence import Request, Sequence
from forkserve.outputs import CompletionOutput, Logprob, RequestOutput
from forkserve.sampling_params import SamplingParams
from forkserve.worker.plan import SamplerOutput


class OutputProcessor:
    """Detokenises sequences as they grow and builds outputs (tokenizer may be None: ids only)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def text(self, seq: Sequence) -> str:
        """The text of seq's known output tokens, brought up to date with the tokens it gained."""
        detokenizer = seq.detokenizer
        if detokenizer is None:
            detokenizer = seq.detokenizer = IncrementalDetokenizer(self.tokenizer,
                                                                   seq.request.params.skip_special_tokens)
        detokenizer.update(seq.token_ids, seq.num_prompt_tokens, len(seq.token_ids) - seq.num_pending)
        return detokenizer.text

    def find_stop_string(self, seq: Sequence, params: SamplingParams) -> str | None:
        """The earliest stop string in seq's text (only the new text, plus room for a stop string
        straddling it, can hold a new hit); seq.text is then cut there."""
        searched = len(seq.text)
        text = seq.text = self.text(seq)
        search_from = max(0, searched - max(len(s) for s in params.stop) + 1)
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

    def logprob_entry(self, token: int, result: SamplerOutput, row: int, params: SamplingParams
                      ) -> dict[int, Logprob]:
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

    def _decode_one(self, token: int, params: SamplingParams) -> str | None:
        if self.tokenizer is None or not params.detokenize:
            return None
        return self.tokenizer.decode([token])

    def _prompt_logprobs(self, request: Request) -> list[dict[int, Logprob] | None] | None:
        """vLLM's prompt_logprobs: None for the first token, then per token its entry (computed
        in the prefill pass by the worker)."""
        if request.prompt_logprobs is None:
            return None
        params = request.params
        return [None] + [self._logprob_dict(token, lp, rank, top, params)
                         for token, (lp, rank, top) in zip(request.prompt_token_ids[1:], request.prompt_logprobs[1:])]

    def make_output(self, request: Request) -> RequestOutput:
        """n completions by sample index; with best_of > n, the n of highest cumulative logprob, best first.

        Samples not forked yet (the prompt is still prefilling) show as empty completions.
        """
        params = request.params
        completions = [self._completion(seq, request.is_finished) for seq in request.seqs]
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

    def snapshot(self, request: Request) -> RequestOutput:
        """An unfinished request's output so far, its lists copied (safe to hand to another thread)."""
        output = self.make_output(request)
        for completion in output.outputs:
            if completion.logprobs is not None:
                completion.logprobs = list(completion.logprobs)
        return output

    def _completion(self, seq: Sequence, final: bool) -> CompletionOutput:
        params = seq.request.params
        if seq.stop_reason is not None and isinstance(seq.stop_reason, str):
            text = seq.text  # already cut at the stop string
        elif self.tokenizer is None or not params.detokenize:
            text = ""
        elif final:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=params.skip_special_tokens,
                                         spaces_between_special_tokens=params.spaces_between_special_tokens)
        else:
            text = self.text(seq)
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=list(seq.output_token_ids),
            cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
            logprobs=seq.logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
