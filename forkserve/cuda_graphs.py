"""CUDA graphs of the decode forward: one replay per step instead of hundreds of launches.

Decode batches are padded up to a captured size. Padded rows read and write only the KV cache's
scratch page, so they never touch a real sequence's pages. The LM head stays outside the graph:
its output is large and its single GEMM gains nothing from capture.

Each size is captured with 0..max_levels shared-prefix levels (forkserve/attention/cascade.py),
so cascade decode steps replay a graph too. A level's kernel takes a fixed number of ragged
requests (the batch size): a plan's requests are followed by one filler over the padded rows
and then empty requests, all over the scratch page and outside the merge mask.
"""
from __future__ import annotations

import logging
from bisect import bisect_left

import torch

from forkserve.attention.base import AttentionMetadata
from forkserve.attention.cascade import CascadeLevel
from forkserve.attention.flashinfer import FLASHINFER_WRAPPER_BYTES, FlashInferBackend
from forkserve.engine.pages import KVCache
from forkserve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Small sizes densely (latency), large ones every 32 rows (little padding waste)."""
    sizes = [s for s in (1, 2, 4, 8, 16, 24) if s < max_batch]
    sizes += list(range(32, max_batch, 32))
    return sizes + [max_batch]


class DecodeGraphs:
    @staticmethod
    def reserved_bytes(max_batch: int, max_pages_per_seq: int, max_levels: int) -> int:
        """Device memory the graphs hold besides their activations (which the step reserve covers):
        each size's attention wrappers and the page-index buffers allocated below."""
        wrappers = len(graph_batch_sizes(max_batch)) * (1 + max_levels)
        return wrappers * FLASHINFER_WRAPPER_BYTES + (1 + max_levels) * max_batch * max_pages_per_seq * 4

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, backend: FlashInferBackend,
                 max_batch: int, max_pages_per_seq: int, device: torch.device, max_levels: int = 0) -> None:
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch, self.max_levels = max_batch, max_levels
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.kv_indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(max_batch * max_pages_per_seq, dtype=torch.int32, device=device)
        self.kv_last_page_len = torch.zeros(max_batch, dtype=torch.int32, device=device)
        # Per shared level, shared by every size (each size plans into slices of them).
        self.level_qo_indptr = torch.zeros(max_levels, max_batch + 1, dtype=torch.int32, device=device)
        self.level_kv_indptr = torch.zeros(max_levels, max_batch + 1, dtype=torch.int32, device=device)
        self.level_kv_indices = torch.zeros(max_levels, max_batch * max_pages_per_seq, dtype=torch.int32, device=device)
        self.level_last_page_len = torch.zeros(max_levels, max_batch, dtype=torch.int32, device=device)
        self.level_member = torch.zeros(max_levels, max_batch, dtype=torch.bool, device=device)
        self.scratch_slot = kv_cache.scratch_page * kv_cache.page_size
        self.wrappers: dict[int, tuple[object, list[object]]] = {}  # size -> decode wrapper, level wrappers
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (size, levels)
        self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            decode = self.backend.graph_decode_wrapper(self.kv_indptr[:size + 1], self.kv_indices,
                                                       self.kv_last_page_len[:size])
            levels = [self.backend.graph_level_wrapper(self.level_qo_indptr[d, :size + 1],
                                                       self.level_kv_indptr[d, :size + 1], self.level_kv_indices[d],
                                                       self.level_last_page_len[d, :size])
                      for d in range(self.max_levels)]
            self.wrappers[size] = (decode, levels)
            self.slots[:size].fill_(self.scratch_slot)
            for num_levels in range(self.max_levels + 1):
                self._plan(size, 0, None)
                for d in range(num_levels):
                    self._plan_level(levels[d], d, None, 0, size)

                def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size=size,
                              active=[(levels[d], self.level_member[d, :size]) for d in range(num_levels)]
                              ) -> torch.Tensor:
                    return self.backend.run(decode, layer, q, k, v, self.kv_cache, self.slots[:size], active)

                self.model(self.input_ids[:size], self.positions[:size], attention)  # warm-up outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self.model(self.input_ids[:size], self.positions[:size], attention)
                pool = graph.pool()
                self.graphs[(size, num_levels)] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s, with 0-%d shared-prefix levels",
                    self.sizes, self.max_levels)

    def _plan(self, size: int, rows: int, meta: AttentionMetadata | None) -> None:
        """Plan the own-pages decode of `rows` real rows (all pages without a cascade plan), padded to size:
        each padded row reads one token of the scratch page."""
        pad = size - rows
        indptr_tail = torch.arange(1, pad + 1, dtype=torch.int32)
        indices = torch.full((pad,), self.kv_cache.scratch_page, dtype=torch.int32)
        last = torch.ones(pad, dtype=torch.int32)
        if meta is None:
            indptr = torch.cat([torch.zeros(1, dtype=torch.int32), indptr_tail])
        else:
            plan = meta.cascade
            kv_indptr, kv_indices = (meta.kv_indptr, meta.kv_indices) if plan is None else (plan.own_indptr,
                                                                                              plan.own_indices)
            indptr = torch.cat([kv_indptr, indptr_tail + kv_indptr[-1]])
            indices = torch.cat([kv_indices, indices])
            last = torch.cat([meta.kv_last_page_len, last])
        decode, _ = self.wrappers[size]
        self.backend.plan_decode(decode, indptr, indices, last, self.kv_cache)

    def _plan_level(self, wrapper, depth: int, level: CascadeLevel | None, rows: int, size: int) -> None:
        """Plan a level's requests, then a filler over rows..size and empty requests up to size requests."""
        extra = size - (0 if level is None else level.num_requests)
        indices = torch.full((extra,), self.kv_cache.scratch_page, dtype=torch.int32)
        last = torch.ones(extra, dtype=torch.int32)
        if level is None:  # capture: `size` one-row requests over the scratch page
            qo = torch.arange(size + 1, dtype=torch.int32)
            kv_ptr = torch.arange(size + 1, dtype=torch.int32)
        else:
            qo = torch.cat([level.qo_indptr, torch.full((extra,), size, dtype=torch.int32)])
            kv_ptr = torch.cat([level.kv_indptr, torch.arange(1, extra + 1, dtype=torch.int32) + level.kv_indptr[-1]])
            indices = torch.cat([level.kv_indices, indices])
            last = torch.cat([level.kv_last_page_len, last])
        self.backend.plan_level(wrapper, qo, kv_ptr, indices, last, self.kv_cache)
        member = self.level_member[depth]
        if level is not None:
            member[:rows].copy_(level.member)
        member[rows:size].fill_(False)

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Decode steps that fit the captured buffers and levels."""
        if not (meta.is_decode and meta.num_seqs <= self.max_batch
                and meta.kv_indices.shape[0] + self.max_batch <= self.kv_indices.shape[0]):
            return False
        levels = meta.cascade.levels if meta.cascade is not None else []
        return len(levels) <= self.max_levels and \
            all(level.kv_indices.shape[0] + self.max_batch <= self.level_kv_indices.shape[1] for level in levels)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode forward's hidden states for the batch's rows, by graph replay."""
        rows = meta.num_seqs
        size = self.sizes[bisect_left(self.sizes, rows)]
        levels = meta.cascade.levels if meta.cascade is not None else []
        graph, hidden = self.graphs[(size, len(levels))]
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(positions)
        self.slots[:rows].copy_(meta.slot_mapping)
        self.slots[rows:size].fill_(self.scratch_slot)
        self._plan(size, rows, meta)
        _, wrappers = self.wrappers[size]
        for depth, level in enumerate(levels):
            self._plan_level(wrappers[depth], depth, level, rows, size)
        graph.replay()
        return hidden[:rows]
