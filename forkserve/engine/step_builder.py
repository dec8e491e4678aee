"""A scheduled batch as the worker's `StepPlan`: the one place where sequences become flat arrays."""
from __future__ import annotations

from array import array

import numpy as np

from forkserve.engine.locations import Transfers
from forkserve.engine.scheduler import ScheduledSeq
from forkserve.engine.sequence import Sequence
from forkserve.engine.sharing import BatchSharing, CascadeRule
from forkserve.worker.plan import (PLACEHOLDER, DrawRequest, PromptLogprobRange, PromptLogprobs, SamplingRow, StepPlan,
                                   TokenBitmask)


class StepBuilder:
    """Orders a scheduled batch and turns it into a `StepPlan` (its sampling rows as values).

    With a cascade rule, rows under one tree node are made adjacent (each shared group is then
    one attention request) and the plan carries the batch's sharing (engine/sharing.py).
    """

    def __init__(self, page_size: int, rule: CascadeRule | None, stop_token_ids: set[int]) -> None:
        self.page_size = page_size
        self.stop_token_ids = stop_token_ids  # blocked before a request's min_tokens
        self.sharing = None if rule is None else BatchSharing(rule, page_size)
        self.transfers = Transfers()  # page copies and tier moves, carried by the next plan

    def order(self, batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """Rows by tree path (sequences that share adjacent); in a step that also prefills, its
        single-token rows first (a stable sort): the GPU backend runs them through its decode
        kernel, as one run of rows, and only the others through the prefill kernel."""
        if self.sharing is not None and len(batch) > 1:
            batch = [batch[i] for i in self.sharing.order([item.seq.kv.node for item in batch])]
        if any(item.num_new_tokens != 1 for item in batch):
            batch = sorted(batch, key=lambda item: item.num_new_tokens != 1)
        return batch

    def draw_request(self, seq: Sequence) -> DrawRequest:
        """One row for seq's own draw plus one per sample it forks into here, or a beam probe."""
        if seq.probe_k:
            return DrawRequest(top_k=seq.probe_k)
        request = seq.request
        seeds = [seq.seed] + [request.sample_seed(i) for i in request.pending_forks(seq)]
        return DrawRequest([self.sampling_row(seq, seed) for seed in seeds])

    def sampling_row(self, seq: Sequence, seed: int | None) -> SamplingRow:
        """seq's draw with this seed, as the sampler takes it (stop tokens blocked before min_tokens)."""
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

    @staticmethod
    def take_prompt_logprobs(batch: list[ScheduledSeq], plan: StepPlan, values: list[PromptLogprobs]) -> None:
        """The prompt logprobs the worker computed for `plan`, appended to their requests'."""
        for wanted, computed in zip(plan.prompt_logprobs, values):
            batch[wanted.row].seq.request.prompt_logprobs.extend(computed)

    def build(self, batch: list[ScheduledSeq], draws: list[DrawRequest] | None = None,
              rows: list[SamplingRow] | None = None, bitmask: TokenBitmask | None = None) -> StepPlan:
        """The plan of an ordered batch; `draws` (a synchronous step, with its constrained rows'
        `bitmask`) or `rows` (a launched one) are those of its sampling rows, in order.

        The only per-row Python work is copying from C arrays into C arrays (no per-row objects:
        this runs for every row of every step, ~1,000 rows in 1 ms); a sequence whose last token is a
        PLACEHOLDER takes it from the previous step's draw row `seq.pending_row`.
        """
        num_rows, page_size = len(batch), self.page_size
        input_ids: list[int] = []
        kv_indices = array("i")
        kv_ends = array("i", bytes(4 * num_rows))  # each row's end in kv_indices
        starts = array("q", bytes(8 * num_rows))
        new_tokens = array("q", bytes(8 * num_rows))
        logits_rows: list[int] = []
        pending: list[tuple[int, int]] = []
        prompt_logprobs: list[PromptLogprobRange] = []
        for b, item in enumerate(batch):
            seq, n = item.seq, item.num_new_tokens
            token_ids, start = seq.token_ids, seq.num_computed_tokens
            end = start + n
            if seq.request.prompt_logprobs is not None and seq.request.wants_prompt_logprobs:
                wanted = _prompt_logprob_range(item, b, len(input_ids))
                if wanted is not None:
                    prompt_logprobs.append(wanted)
            if n == 1:  # a decode row (most rows of most steps): no slice object
                input_ids.append(token_ids[start])
            else:
                input_ids.extend(token_ids[start:end])
            table = seq.kv.page_table()
            num_pages = -(-end // page_size)
            kv_indices.extend(table if num_pages == len(table) else table[:num_pages])
            kv_ends[b], starts[b], new_tokens[b] = len(kv_indices), start, n
            if end == len(token_ids):  # computes its last known token: draws the next one
                logits_rows.append(len(input_ids) - 1)
                if token_ids[-1] == PLACEHOLDER:
                    pending.append((len(input_ids) - 1, seq.pending_row))
        kv_indptr = np.zeros(num_rows + 1, dtype=np.int32)
        kv_indptr[1:] = np.frombuffer(kv_ends, dtype=np.int32)
        starts, new_tokens = np.frombuffer(starts, dtype=np.int64), np.frombuffer(new_tokens, dtype=np.int64)
        query_start = np.zeros(num_rows + 1, dtype=np.int32)
        np.cumsum(new_tokens, out=query_start[1:])
        plan = StepPlan(np.asarray(input_ids, dtype=np.int64), query_start, starts, kv_indptr,
                        np.frombuffer(kv_indices, dtype=np.int32), logits_rows, draws, rows, pending,
                        transfers=self.transfers.take(), bitmask=bitmask, prompt_logprobs=prompt_logprobs)
        if self.sharing is not None and num_rows > 1:
            plan.sharing_key, plan.sharing = self.sharing.sharing([item.seq.kv.node for item in batch])
        return plan


def _prompt_logprob_range(item: ScheduledSeq, row: int, first_token: int) -> PromptLogprobRange | None:
    """The prompt positions of this chunk whose next prompt token's logprobs are still owed
    (position p predicts token p + 1); None when the chunk predicts none of them."""
    seq, request = item.seq, item.seq.request
    start = seq.num_computed_tokens
    lo = max(len(request.prompt_logprobs) - 1, start)
    hi = min(start + item.num_new_tokens, len(request.prompt_token_ids) - 1)
    if lo >= hi:
        return None
    return PromptLogprobRange(row, first_token + lo - start, np.asarray(request.prompt_token_ids[lo + 1:hi + 1],
                                                                         dtype=np.int64),
                              request.params.prompt_logprobs)
