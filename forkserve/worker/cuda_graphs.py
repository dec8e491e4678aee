"""CUDA graphs of the decode forward: one replay per step instead of hundreds of launches.

Decode batches are padded up to a captured size. Padded rows read and write only the KV cache's
scratch page, so they never touch a real sequence's pages. The LM head stays outside the graph:
its output is large and its single GEMM gains nothing from capture.

Each size is captured with each of FlashInfer's two decode kernels, chosen per step by the
rows' mean page count and number (`uses_tensor_cores`), and, when cascade attention is on, both
plain and with the shared-prefix levels (forkserve/worker/attention/cascade.py) that the Triton
shared-level kernel reads from fixed buffers (`DecodeLevels`), so cascade decode steps replay a
graph too.
"""
from __future__ import annotations

import logging
from bisect import bisect_left

import numpy as np
import torch

from forkserve.worker.attention.base import AttentionMetadata
from forkserve.worker.attention.flashinfer import (CUDA_CORE_DECODE_MAX_PAGES, FLASHINFER_WRAPPER_BYTES, DecodeLevels,
                                            FlashInferBackend, decode_uses_tensor_cores, kv_token_counts)
from forkserve.worker.kv_cache import KVCache
from forkserve.model.llama import LlamaForCausalLM
from forkserve.transfer import fill_from_host

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, then every 8 rows to 256 and every 16 beyond (as vLLM captures); also the row
    counts logits are computed for (runner.py). Padding costs more than the padded rows: cuBLAS
    picks its tiles by row count, and on an H100 a layer's GEMMs take 416 us at 683 rows but
    457 us at 704 (`scripts/attention_probe.py gemm`; `curve` shows the whole erratic curve)."""
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, max_batch, 16))
    return [s for s in sizes if s < max_batch] + [max_batch]


def padded_size(sizes: list[int], rows: int) -> int:
    """The smallest of `sizes` (ascending) that holds `rows`; rows itself past the largest."""
    return sizes[bisect_left(sizes, rows)] if sizes and rows <= sizes[-1] else rows


class DecodeGraphs:
    @staticmethod
    def _level_pages(max_batch: int, max_pages_per_seq: int, max_levels: int) -> int:
        """Shared pages a step's levels may list: each group (of >= 2 rows) its pages once."""
        return max_levels * (max_batch // 2) * max_pages_per_seq

    @staticmethod
    def reserved_bytes(max_batch: int, max_pages_per_seq: int, max_levels: int, num_q_heads: int,
                       head_dim: int) -> int:
        """Device memory the graphs hold besides their activations' pool (worker/memory.py measures that):
        the decode wrappers' shared schedule buffer, the page-index buffers and the shared levels'
        buffers."""
        wrappers = FLASHINFER_WRAPPER_BYTES  # one schedule buffer serves every graph wrapper
        levels = DecodeLevels.bytes_needed(max_batch, DecodeGraphs._level_pages(max_batch, max_pages_per_seq,
                                                                                max_levels),
                                           max_levels, num_q_heads, head_dim) if max_levels else 0
        return wrappers + max_batch * max_pages_per_seq * 4 + levels

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, backend: FlashInferBackend,
                 max_batch: int, max_pages_per_seq: int, device: torch.device, max_levels: int = 0) -> None:
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch, self.max_levels = max_batch, max_levels
        self.cuda_core_max_pages = CUDA_CORE_DECODE_MAX_PAGES
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.kv_indptr = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(max_batch * max_pages_per_seq, dtype=torch.int32, device=device)
        self.kv_last_page_len = torch.zeros(max_batch, dtype=torch.int32, device=device)
        # Every graph writes its hidden states here, so none keeps an output of its own in the graph
        # pool (hundreds of graphs would hold a gigabyte) and all share the pool's intermediates.
        self.hidden = torch.zeros(max_batch, model.config.hidden_size, dtype=model.embed_tokens.weight.dtype,
                                  device=device)
        self.levels = DecodeLevels(max_batch, self._level_pages(max_batch, max_pages_per_seq, max_levels), max_levels,
                                   backend.num_q_heads, backend.head_dim, device) if max_levels else None
        self.scratch_slot = kv_cache.scratch_page * kv_cache.page_size
        self.wrappers: dict[tuple[int, bool], object] = {}  # (size, tensor cores) -> decode wrapper
        # (size, tensor cores, with levels) -> graph; all write their output to self.hidden
        self.graphs: dict[tuple[int, bool, bool], torch.cuda.CUDAGraph] = {}
        self._capture_all()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        variants = [(cores, levels) for cores in (True, False) for levels in (False, True)
                    if self.levels is not None or not levels]
        for size in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            self.slots[:size].fill_(self.scratch_slot)
            for tensor_cores, with_levels in variants:
                if (size, tensor_cores) not in self.wrappers:
                    self.wrappers[(size, tensor_cores)] = self.backend.graph_decode_wrapper(
                        self.kv_indptr[:size + 1], self.kv_indices, self.kv_last_page_len[:size], tensor_cores)
                decode = self.wrappers[(size, tensor_cores)]
                self._plan(decode, size, 0, None)  # at capture the levels' buffers hold no work

                def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size=size, decode=decode,
                              levels=self.levels if with_levels else ()) -> torch.Tensor:
                    return self.backend.run([(decode, slice(None))], layer, q, k, v, self.kv_cache, self.slots[:size],
                                            levels)

                self.model(self.input_ids[:size], self.positions[:size], attention)  # warm-up outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.hidden[:size].copy_(self.model(self.input_ids[:size], self.positions[:size], attention))
                pool = graph.pool()
                self.graphs[(size, tensor_cores, with_levels)] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s, with both decode kernels%s", self.sizes,
                    f", each also with up to {self.max_levels} shared-prefix levels" if self.levels else "")

    def _plan(self, decode, size: int, rows: int, meta: AttentionMetadata | None) -> None:
        """Plan the own-pages decode of `rows` real rows (all pages without a cascade plan), padded to size:
        each padded row reads one token of the scratch page."""
        indptr, indices, last = self._decode_tables(size, rows, meta)
        if meta is None:  # capture: FlashInfer's own plan, then prove the direct re-plan matches it
            self.backend.plan_decode(decode, *(torch.from_numpy(a) for a in (indptr, indices, last)), self.kv_cache)
            self.backend.check_replan(decode, *self._schedule_inputs(indptr, last), self.kv_cache.page_size)
            return
        fill_from_host([(self.kv_indptr, indptr), (self.kv_last_page_len, last), (self.kv_indices, indices)])
        self.backend.replan_graph_wrapper(decode, *self._schedule_inputs(indptr, last), self.kv_cache.page_size)

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

    def _schedule_inputs(self, kv_indptr: np.ndarray, last: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """What FlashInfer's scheduler takes: the host KV indptr, and KV tokens per row."""
        return torch.from_numpy(kv_indptr), torch.from_numpy(kv_token_counts(kv_indptr, last, self.kv_cache.page_size))

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Decode steps that fit the captured buffers and levels."""
        if not (meta.is_decode and meta.num_seqs <= self.max_batch
                and meta.kv_indices.shape[0] + self.max_batch <= self.kv_indices.shape[0]):
            return False
        plan = meta.cascade
        if plan is None:
            return True
        return self.levels is not None and len(plan.levels) <= self.max_levels and \
            len(plan.work.work) <= self.levels.work.shape[0] and len(plan.work.pages) <= self.levels.pages.shape[0]

    def uses_tensor_cores(self, meta: AttentionMetadata) -> bool:
        """Whether a step's own-pages decode runs FlashInfer's tensor-core kernel (long page lists)
        rather than its CUDA-core one."""
        pages = (meta.kv_indices if meta.cascade is None else meta.cascade.own_indices).shape[0]
        return decode_uses_tensor_cores(pages, meta.num_seqs, self.cuda_core_max_pages)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode forward's hidden states by graph replay: the batch's rows, then the padding
        rows up to the captured size (so that logits can be computed for that size, runner.py)."""
        rows = meta.num_seqs
        size = padded_size(self.sizes, rows)
        plan = meta.cascade
        tensor_cores = self.uses_tensor_cores(meta)
        graph = self.graphs[(size, tensor_cores, plan is not None)]
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(positions)
        self.slots[:rows].copy_(meta.slot_mapping)
        self.slots[rows:size].fill_(self.scratch_slot)
        self._plan(self.wrappers[(size, tensor_cores)], size, rows, meta)
        if plan is not None:
            self.levels.fill(plan.work, size)
        graph.replay()
        return self.hidden[:size]
