"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and samples."""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from forkserve.attention.base import AttentionBackend, AttentionMetadata
from forkserve.attention.cascade import CascadePlanner
from forkserve.cuda_graphs import DecodeGraphs, padded_size
from forkserve.engine.pages import KVCache
from forkserve.engine.scheduler import ScheduledSeq
from forkserve.engine.forks import DrawRequest, ForkingSampler, StepDraws
from forkserve.model.llama import LlamaForCausalLM
from forkserve.sampler import Draws, SamplerOutput, SamplingRow, TokenBitmask
from forkserve.sampling_params import ALL_LOGPROBS
from forkserve.transfer import to_device

PLACEHOLDER = -1  # token id of a draw still on the GPU; the next step reads it from there
PROMPT_LOGPROB_ROWS = 256  # prompt positions whose logits are computed at once for prompt_logprobs


def build_metadata(batch: list[ScheduledSeq], kv_cache: KVCache, device: torch.device,
                   cascade: CascadePlanner | None = None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Flat input ids and positions of the step's new tokens, plus where their KV lives.

    The only per-sequence Python work is slicing C arrays; everything per token is numpy, and
    ids, positions and slots reach the device in one copy. With a cascade planner, the sharing
    among the batch's tree paths that its rule finds worth it becomes the step's cascade plan.
    """
    num_seqs, page_size = len(batch), kv_cache.page_size
    input_ids: list[int] = []
    kv_indices = array("i")
    kv_indptr = np.zeros(num_seqs + 1, dtype=np.int32)
    starts = np.empty(num_seqs, dtype=np.int64)
    new_tokens = np.empty(num_seqs, dtype=np.int64)
    for b, item in enumerate(batch):
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_new_tokens
        input_ids.extend(seq.token_ids[start:end])
        kv_indices.extend(seq.kv.page_table()[:-(-end // page_size)])
        kv_indptr[b + 1] = len(kv_indices)
        starts[b], new_tokens[b] = start, item.num_new_tokens
    query_start = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(new_tokens, out=query_start[1:])
    context_lens = starts + new_tokens
    pages = np.frombuffer(kv_indices, dtype=np.int32)
    row_of_token = np.repeat(np.arange(num_seqs), new_tokens)
    positions = np.arange(len(input_ids)) - query_start[:-1][row_of_token] + starts[row_of_token]
    slots = pages[kv_indptr[:-1][row_of_token] + positions // page_size].astype(np.int64) * page_size \
        + positions % page_size
    on_device = to_device(np.stack([np.asarray(input_ids, dtype=np.int64), positions, slots]), device)
    meta = AttentionMetadata(
        query_start=torch.from_numpy(query_start),
        kv_indptr=torch.from_numpy(kv_indptr),
        kv_indices=torch.from_numpy(pages),
        kv_last_page_len=torch.from_numpy(((context_lens - 1) % page_size + 1).astype(np.int32)),
        context_lens=context_lens.tolist(),
        slot_mapping=on_device[2],
        page_size=page_size,
    )
    if cascade is not None and num_seqs > 1:
        meta.cascade = cascade.plan([item.seq.kv.node for item in batch], kv_indptr, pages, query_start, page_size,
                                    kv_cache.scratch_page, device)
    return on_device[0], on_device[1], meta


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued: its draws reach the host when `result` is called."""

    tokens: torch.Tensor  # drawn token per sampling row, on the device: the next step's inputs
    draws: Draws  # host copies in flight
    output: SamplerOutput | None = None  # the draws on the host, once read

    def result(self) -> SamplerOutput:
        """The draws on the host (waits for them the first time; a step's mask may read them early)."""
        if self.output is None:
            self.output = self.draws.to_host()
        return self.output


class ModelRunner:
    """Owns the model, the KV tensors and the attention backend for one device."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, backend: AttentionBackend,
                 sampler: ForkingSampler, device: torch.device, graphs: DecodeGraphs | None = None,
                 cascade: CascadePlanner | None = None, logits_sizes: list[int] | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.graphs = graphs
        self.cascade = cascade
        self.logits_sizes = logits_sizes or []
        self._load_logits_kernels()
        # KV pages one layer's attention read, summed over steps, and what plain attention would
        # have read (each sequence its whole page table): the cascade's saving, for stats.
        self.kv_pages_read = 0
        self.kv_pages_listed = 0
        self.cascade_steps = 0

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], draws: list[DrawRequest],
                bitmask: TokenBitmask | None = None) -> StepDraws | None:
        """Run one step and wait for its draws; `draws` are, in batch order, those of the sequences
        that sample, and `bitmask` the allowed tokens of its constrained draw rows."""
        logits = self._forward(batch, None)
        return None if logits is None else self.sampler(logits, draws, bitmask)

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq], rows: list[SamplingRow], previous: LaunchedStep | None,
               bitmask: Callable[[], TokenBitmask | None] | None = None) -> LaunchedStep:
        """Queue one step of plain draws (one row per sampling sequence) without waiting for it.

        A sequence whose last token is a PLACEHOLDER takes it from `previous` (row
        `seq.pending_row`), on the device. `bitmask` (structured outputs) is called once the
        forward is queued: the host fills the step's token mask, which may need `previous`'s
        tokens, while the GPU computes; the draws are queued after it.
        """
        logits = self._forward(batch, previous)
        assert logits is not None, "a launched step must sample"
        draws = self.sampler.sampler.draw(logits, rows, bitmask() if bitmask is not None else None)
        return LaunchedStep(draws.tokens, draws.copy_to_host())

    def _forward(self, batch: list[ScheduledSeq], previous: LaunchedStep | None) -> torch.Tensor | None:
        """Logits at the last token of each sampling sequence (None if none samples)."""
        input_ids, positions, meta = build_metadata(batch, self.kv_cache, self.device, self.cascade)
        self._count_kv_reads(meta)
        query_ends = meta.query_start.tolist()[1:]
        pending = [(query_ends[b] - 1, item.seq.pending_row) for b, item in enumerate(batch)
                   if item.seq.token_ids[-1] == PLACEHOLDER]
        if pending:
            # The placeholder is the last token of its sequence, so always the last one this step computes.
            assert previous is not None, "a placeholder token without the step that draws it"
            index = to_device(pending, self.device, torch.long)
            input_ids.index_copy_(0, index[:, 0], previous.tokens[index[:, 1]])
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            self.backend.prepare(meta, self.kv_cache)

            def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return self.backend.forward(layer, q, k, v, self.kv_cache, meta)

            hidden = self.model(input_ids, positions, attention)
        for b, item in enumerate(batch):
            if item.seq.request.wants_prompt_logprobs:
                self._prompt_logprobs(hidden, query_ends[b] - item.num_new_tokens, item)
        last = [query_ends[b] - 1 for b, item in enumerate(batch) if item.samples]
        return self._logits(hidden, last) if last else None

    def _logits(self, hidden: torch.Tensor, last: list[int]) -> torch.Tensor:
        """Logits of hidden's rows `last` (increasing), computed for a row count padded up to one of
        `logits_sizes`, which start-up ran once each: cuBLAS picks its kernel by row count, and the
        first run of a kernel holds the host until the GPU has finished all queued work (on an H100
        a prefill step's logits waited 250-680 ms so), after which the GPU sat idle until the next
        step was queued (~50 ms per new kernel)."""
        rows = len(last)
        padded = padded_size(self.logits_sizes, rows)
        if last[-1] == rows - 1 and hidden.shape[0] >= padded:  # the leading rows: every row samples
            return self.model.compute_logits(hidden[:padded])[:rows]
        index = to_device(last + [last[-1]] * (padded - rows), self.device, torch.long)
        return self.model.compute_logits(hidden[index])[:rows]

    def _prompt_logprobs(self, hidden: torch.Tensor, first_row: int, item: ScheduledSeq) -> None:
        """Logprobs of the prompt tokens this step's chunk predicts (position p predicts token p + 1),
        appended to the request's: the actual token's logprob and rank, and the top k. Only for
        requests that ask, PROMPT_LOGPROB_ROWS positions at a time (each is a vocabulary of floats)."""
        seq, request = item.seq, item.seq.request
        start = seq.num_computed_tokens
        prompt_len = len(request.prompt_token_ids)
        lo = max(len(request.prompt_logprobs) - 1, start)
        hi = min(start + item.num_new_tokens, prompt_len - 1)
        want = request.params.prompt_logprobs
        for a in range(lo, hi, PROMPT_LOGPROB_ROWS):
            b = min(a + PROMPT_LOGPROB_ROWS, hi)
            rows = hidden[first_row + a - start:first_row + b - start]
            logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
            k = logprobs.shape[-1] if want == ALL_LOGPROBS else want
            targets = to_device(request.prompt_token_ids[a + 1:b + 1], self.device, torch.long)
            chosen = logprobs.gather(1, targets[:, None])
            ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
            top = torch.topk(logprobs, k, dim=-1) if k else None
            top_ids = top.indices.tolist() if top is not None else [[]] * (b - a)
            top_values = top.values.tolist() if top is not None else [[]] * (b - a)
            for lp, rank, ids, values in zip(chosen[:, 0].tolist(), ranks, top_ids, top_values):
                request.prompt_logprobs.append((lp, rank, list(zip(ids, values))))

    @torch.inference_mode()
    def _load_logits_kernels(self) -> None:
        """Run the LM head once at each of `logits_sizes`, so no step is the first to use a kernel.
        Largest first: each smaller output then fits in a block the allocator holds already (in
        increasing order every output took a new segment, 8.4 GiB of cache on the 8B shape)."""
        for rows in reversed(self.logits_sizes):
            self.model.compute_logits(torch.zeros(rows, self.model.config.hidden_size,
                                                  dtype=self.model.embed_tokens.weight.dtype, device=self.device))

    def _count_kv_reads(self, meta: AttentionMetadata) -> None:
        listed = meta.kv_indices.shape[0]
        self.kv_pages_listed += listed
        if meta.cascade is None:
            self.kv_pages_read += listed
        else:
            self.kv_pages_read += meta.cascade.pages_read
            self.cascade_steps += 1
