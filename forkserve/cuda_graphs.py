"""CUDA graphs of the decode forward: one replay per step instead of hundreds of launches.

Decode batches are padded up to a captured size. Padded rows read and write only the KV cache's
scratch page, so they never touch a real sequence's pages. The LM head stays outside the graph:
its output is large and its single GEMM gains nothing from capture.
"""
from __future__ import annotations

import logging
from bisect import bisect_left

import torch

from forkserve.attention.base import AttentionMetadata
from forkserve.attention.flashinfer import FlashInferBackend
from forkserve.engine.pages import KVCache
from forkserve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Small sizes densely (latency), large ones every 32 rows (little padding waste)."""
    sizes = [s for s in (1, 2, 4, 8, 16, 24) if s < max_batch]
    sizes += list(range(32, max_batch, 32))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, backend: FlashInferBackend,
                 max_batch: int, max_pages_per_seq: int, device: torch.device) -> None:
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = max_batch
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.kv_indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(max_batch * max_pages_per_seq, dtype=torch.int32, device=device)
        self.kv_last_page_len = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.scratch_slot = kv_cache.scratch_page * kv_cache.page_size
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor]] = {}
        self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            wrapper = self.backend.graph_decode_wrapper(self.kv_indptr[:size + 1], self.kv_indices,
                                                        self.kv_last_page_len[:size])
            self._plan(wrapper, size, *self._padding(0, size))
            self.slots[:size].fill_(self.scratch_slot)

            def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          wrapper=wrapper, size=size) -> torch.Tensor:
                return self.backend.run(wrapper, layer, q, k, v, self.kv_cache, self.slots[:size])

            self.model(self.input_ids[:size], self.positions[:size], attention)  # warm-up outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(self.input_ids[:size], self.positions[:size], attention)
            pool = graph.pool()
            self.graphs[size] = (graph, wrapper, hidden)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _padding(self, start_pages: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR pages for `rows` padded rows: one scratch page each, holding one token."""
        indptr = torch.arange(1, rows + 1, dtype=torch.int32) + start_pages
        indices = torch.full((rows,), self.kv_cache.scratch_page, dtype=torch.int32)
        last = torch.ones(rows, dtype=torch.int32)
        return indptr, indices, last

    def _plan(self, wrapper, size: int, indptr_tail: torch.Tensor, indices: torch.Tensor, last: torch.Tensor,
              meta: AttentionMetadata | None = None) -> None:
        if meta is None:
            indptr = torch.cat([torch.zeros(1, dtype=torch.int32), indptr_tail])
        else:
            indptr = torch.cat([meta.kv_indptr, indptr_tail])
            indices = torch.cat([meta.kv_indices, indices])
            last = torch.cat([meta.kv_last_page_len, last])
        self.backend.plan_decode(wrapper, indptr, indices, last, self.kv_cache)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode and meta.num_seqs <= self.max_batch and \
            meta.kv_indices.shape[0] + self.max_batch <= self.kv_indices.shape[0]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode forward's hidden states for the batch's rows, by graph replay."""
        rows = meta.num_seqs
        size = self.sizes[bisect_left(self.sizes, rows)]
        graph, wrapper, hidden = self.graphs[size]
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(positions)
        self.slots[:rows].copy_(meta.slot_mapping)
        self.slots[rows:size].fill_(self.scratch_slot)
        pad = size - rows
        self._plan(wrapper, size, *self._padding(int(meta.kv_indptr[-1]), pad), meta=meta)
        graph.replay()
        return hidden[:rows]
