"""Turns a step plan into tensors, runs the model over the paged KV cache, and samples."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from forkserve.worker.attention.base import AttentionBackend, AttentionMetadata
from forkserve.worker.attention.cascade import CascadePlanner
from forkserve.model.llama import LlamaForCausalLM
from forkserve.sampler import Draws, SamplerOutput, TokenBitmask
from forkserve.sampling_params import ALL_LOGPROBS
from forkserve.transfer import to_device
from forkserve.worker.cuda_graphs import DecodeGraphs, padded_size
from forkserve.worker.forking_sampler import ForkingSampler
from forkserve.worker.kv_cache import KVCache
from forkserve.worker.transfers import KVTransfers
from forkserve.worker.plan import PromptLogprobRange, PromptLogprobs, StepPlan, StepResult

PROMPT_LOGPROB_ROWS = 256  # prompt positions whose logits are computed at once for prompt_logprobs


def build_metadata(plan: StepPlan, kv_cache: KVCache, device: torch.device,
                   cascade: CascadePlanner | None = None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Flat input ids and positions of the step's new tokens, plus where their KV lives.

    Everything per token is numpy, and ids, positions and slots reach the device in one copy.
    With a cascade planner, the plan's sharing becomes the step's cascade plan.
    """
    page_size, query_start, kv_indptr = kv_cache.page_size, plan.query_start, plan.kv_indptr
    starts, new_tokens = plan.num_computed, np.diff(query_start)
    context_lens = starts + new_tokens
    pages = plan.kv_indices
    row_of_token = np.repeat(np.arange(plan.num_rows), new_tokens)
    positions = np.arange(len(plan.input_ids)) - query_start[:-1][row_of_token] + starts[row_of_token]
    slots = pages[kv_indptr[:-1][row_of_token] + positions // page_size].astype(np.int64) * page_size \
        + positions % page_size
    on_device = to_device(np.stack([plan.input_ids, positions, slots]), device)
    meta = AttentionMetadata(
        query_start=torch.from_numpy(query_start),
        kv_indptr=torch.from_numpy(kv_indptr),
        kv_indices=torch.from_numpy(pages),
        kv_last_page_len=torch.from_numpy(((context_lens - 1) % page_size + 1).astype(np.int32)),
        context_lens=context_lens.tolist(),
        slot_mapping=on_device[2],
        page_size=page_size,
    )
    if cascade is not None and plan.sharing is not None:
        meta.cascade = cascade.plan(plan.sharing_key, plan.sharing, kv_indptr, pages, query_start, page_size,
                                    kv_cache.scratch_page, device)
    return on_device[0], on_device[1], meta


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued: its draws reach the host when `result` is called."""

    tokens: torch.Tensor  # drawn token per sampling row, on the device: the next step's inputs
    draws: Draws  # host copies in flight
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # per plan.prompt_logprobs entry
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
                 cascade: CascadePlanner | None = None, logits_sizes: list[int] | None = None,
                 transfers: KVTransfers | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.transfers = transfers or KVTransfers(kv_cache)
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
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Run one step and wait for its draws (`plan.draws`, one per logits row, masked by
        `plan.bitmask` where it constrains them); None when nothing samples and no prompt logprobs
        were asked for."""
        logits, prompt_logprobs = self._forward(plan, None)
        if logits is None:
            return None if not prompt_logprobs else StepResult(None, [], [], prompt_logprobs)
        result = self.sampler(logits, plan.draws, plan.bitmask)
        result.prompt_logprobs = prompt_logprobs
        return result

    @torch.inference_mode()
    def launch(self, plan: StepPlan, previous: LaunchedStep | None,
               bitmask: Callable[[], TokenBitmask | None] | None = None) -> LaunchedStep:
        """Queue one step of plain draws (`plan.rows`, one per logits row) without waiting for it.

        The plan's pending tokens are taken from `previous`'s draws, on the device. `bitmask`
        (structured outputs) is called once the forward is queued: the core fills the step's token
        mask, which may need `previous`'s tokens, while the GPU computes; the draws are queued after it.
        """
        logits, prompt_logprobs = self._forward(plan, previous.tokens if previous is not None else None)
        assert logits is not None, "a launched step must sample"
        draws = self.sampler.sampler.draw(logits, plan.rows, bitmask() if bitmask is not None else None)
        return LaunchedStep(draws.tokens, draws.copy_to_host(), prompt_logprobs)

    @torch.inference_mode()
    def forward_only(self, plan: StepPlan, previous_tokens: torch.Tensor | None) -> None:
        """A tensor-parallel rank other than 0: the step's forward, logits and prompt logprobs
        included (their collectives need every rank), without sampling (rank 0 samples)."""
        self._forward(plan, previous_tokens)

    def _forward(self, plan: StepPlan, previous_tokens: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, list[PromptLogprobs]]:
        """Logits at each of the plan's logits rows (None if there are none), and the prompt
        logprobs the plan asks for; placeholders take `previous_tokens` (a launched step's draws)."""
        if plan.transfers:
            self.transfers.run(plan.transfers)
        input_ids, positions, meta = build_metadata(plan, self.kv_cache, self.device, self.cascade)
        self._count_kv_reads(meta)
        if plan.pending:
            # A placeholder is the last token of its sequence, so always the last one this step computes.
            assert previous_tokens is not None, "a placeholder token without the step that draws it"
            index = to_device(plan.pending, self.device, torch.long)
            input_ids.index_copy_(0, index[:, 0], previous_tokens[index[:, 1]])
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            self.backend.prepare(meta, self.kv_cache)

            def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return self.backend.forward(layer, q, k, v, self.kv_cache, meta)

            hidden = self.model(input_ids, positions, attention)
        prompt_logprobs = [self._prompt_logprobs(hidden, wanted) for wanted in plan.prompt_logprobs]
        return (self._logits(hidden, plan.logits_rows) if plan.logits_rows else None), prompt_logprobs

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

    def _prompt_logprobs(self, hidden: torch.Tensor, wanted: PromptLogprobRange) -> PromptLogprobs:
        """Logprobs of the prompt tokens a row's chunk predicts (position p predicts token p + 1):
        per token the actual one's logprob and rank, and the top k; PROMPT_LOGPROB_ROWS positions
        at a time (each is a vocabulary of floats)."""
        values: PromptLogprobs = []
        count = len(wanted.targets)
        for a in range(0, count, PROMPT_LOGPROB_ROWS):
            b = min(a + PROMPT_LOGPROB_ROWS, count)
            rows = hidden[wanted.first_token + a:wanted.first_token + b]
            logprobs = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
            k = logprobs.shape[-1] if wanted.top_k == ALL_LOGPROBS else wanted.top_k
            targets = to_device(wanted.targets[a:b], self.device, torch.long)
            chosen = logprobs.gather(1, targets[:, None])
            ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
            top = torch.topk(logprobs, k, dim=-1) if k else None
            top_ids = top.indices.tolist() if top is not None else [[]] * (b - a)
            top_values = top.values.tolist() if top is not None else [[]] * (b - a)
            for lp, rank, ids, tops in zip(chosen[:, 0].tolist(), ranks, top_ids, top_values):
                values.append((lp, rank, list(zip(ids, tops))))
        return values

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
