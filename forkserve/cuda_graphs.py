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

import numpy as np
import torch

from forkserve.attention.base import AttentionMetadata
from forkserve.attention.cascade import CascadeLevel
from forkserve.attention.flashinfer import FLASHINFER_WRAPPER_BYTES, FlashInferBackend
from forkserve.engine.pages import KVCache
from forkserve.model.llama import LlamaForCausalLM
from forkserve.transfer import to_device

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
        decode, _ = self.wrappers[size]
        indptr, indices, last = self._decode_tables(size, rows, meta)
        if meta is None:  # capture: FlashInfer's own plan, then prove the direct re-plan matches it
            self.backend.plan_decode(decode, *(torch.from_numpy(a) for a in (indptr, indices, last)), self.kv_cache)
            self.backend.check_replan(decode, *self._schedule_inputs(np.arange(size + 1, dtype=np.int32), indptr, last),
                                      self.kv_cache.page_size, causal=False)
            return
        self._fill([(self.kv_indptr, indptr), (self.kv_last_page_len, last), (self.kv_indices, indices)])
        self.backend.replan_graph_wrapper(decode, *self._schedule_inputs(np.arange(size + 1, dtype=np.int32), indptr,
                                                                         last), self.kv_cache.page_size, causal=False)

    def _decode_tables(self, size: int, rows: int, meta: AttentionMetadata | None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Page-table CSR (indptr, indices, last page lengths) of the step's rows plus the padded ones."""
        pad = size - rows
        indptr, indices = np.zeros(1, dtype=np.int32), np.zeros(0, dtype=np.int32)
        last = np.zeros(0, dtype=np.int32)
        if meta is not None:
            plan = meta.cascade
            indptr, indices = (meta.kv_indptr, meta.kv_indices) if plan is None else (plan.own_indptr, plan.own_indices)
            indptr, indices, last = indptr.numpy(), indices.numpy(), meta.kv_last_page_len.numpy()
        return (np.concatenate([indptr, indptr[-1] + np.arange(1, pad + 1, dtype=np.int32)]),
                np.concatenate([indices, np.full(pad, self.kv_cache.scratch_page, dtype=np.int32)]),
                np.concatenate([last, np.ones(pad, dtype=np.int32)]))

    def _fill(self, buffers_and_arrays: list[tuple[torch.Tensor, np.ndarray]]) -> None:
        """Copy int32 host arrays into the start of device buffers, through one pinned staging copy."""
        staged = to_device(np.concatenate([array for _, array in buffers_and_arrays]), self.kv_indptr.device)
        at = 0
        for buffer, array in buffers_and_arrays:
            buffer[:array.shape[0]].copy_(staged[at:at + array.shape[0]])
            at += array.shape[0]

    def _schedule_inputs(self, qo_indptr: np.ndarray, kv_indptr: np.ndarray, last: np.ndarray
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What FlashInfer's scheduler takes: host qo and KV indptr, and KV tokens per request."""
        kv_lens = (np.diff(kv_indptr) - 1) * self.kv_cache.page_size + last
        return torch.from_numpy(qo_indptr), torch.from_numpy(kv_indptr), torch.from_numpy(kv_lens.astype(np.int32))

    def _plan_level(self, wrapper, depth: int, level: CascadeLevel | None, rows: int, size: int) -> None:
        """Plan a level's requests, then a filler over rows..size and empty requests up to size requests."""
        scratch = self.kv_cache.scratch_page
        if level is None:  # capture: `size` one-row requests over the scratch page
            qo = kv_ptr = np.arange(size + 1, dtype=np.int32)
            indices, last = np.full(size, scratch, dtype=np.int32), np.ones(size, dtype=np.int32)
            self.backend.plan_level(wrapper, *(torch.from_numpy(a) for a in (qo, kv_ptr, indices, last)), self.kv_cache)
            self.backend.check_replan(wrapper, *self._schedule_inputs(qo, kv_ptr, last), self.kv_cache.page_size,
                                      causal=False)
            self.level_member[depth, :size].fill_(False)
            return
        extra = size - level.num_requests
        level_kv_indptr = level.kv_indptr.numpy()
        qo = np.concatenate([level.qo_indptr.numpy(), np.full(extra, size, dtype=np.int32)])
        kv_ptr = np.concatenate([level_kv_indptr, level_kv_indptr[-1] + np.arange(1, extra + 1, dtype=np.int32)])
        indices = np.concatenate([level.kv_indices.numpy(), np.full(extra, scratch, dtype=np.int32)])
        last = np.concatenate([level.kv_last_page_len.numpy(), np.ones(extra, dtype=np.int32)])
        self._fill([(self.level_qo_indptr[depth], qo), (self.level_kv_indptr[depth], kv_ptr),
                    (self.level_last_page_len[depth], last), (self.level_kv_indices[depth], indices)])
        self.backend.replan_graph_wrapper(wrapper, *self._schedule_inputs(qo, kv_ptr, last), self.kv_cache.page_size,
                                          causal=False)
        member = self.level_member[depth]
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
