"""FlashInfer paged attention: the GPU path.

A step is planned once (on host tensors, so planning never waits for the GPU) and every layer
reuses the plan. Pure decode steps use the decode kernel (tensor cores for grouped-query heads);
steps with prefill chunks use the ragged-query prefill kernel over paged KV. Decode wrappers
bound to fixed buffers serve the CUDA graphs (see forkserve/worker/cuda_graphs.py).

A step with a cascade plan (forkserve/worker/attention/cascade.py) runs the same kernel over each
sequence's own pages with the log-sum-exp returned, then its shared levels. Decode steps run all
levels in one launch of the Triton shared-level kernel (forkserve/kernels/shared_level.py) and
fold the partials into the own-pages output with its merge kernel, from fixed buffers
(`DecodeLevels`), eagerly or inside the decode CUDA graphs. Prefill steps run one FlashInfer
prefill-kernel pass per level (each group's queries a ragged request, non-causal, over its
shared pages), merged in place into the member rows by merge_state_in_place. Graph wrappers are
re-planned each replay by calling FlashInfer's scheduler directly (`replan_graph_wrapper`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from forkserve.worker.attention.base import AttentionBackend, AttentionMetadata, write_kv
from forkserve.worker.attention.cascade import LevelWork
from forkserve.worker.kv_cache import KVCache
from forkserve.kernels import gpu_kernels
from forkserve.transfer import fill_from_host, to_device

# When FlashInfer's CUDA-core decode kernel beats its tensor-core one: up to this many KV pages
# per row on average, and at large batches (enough rows to fill the GPU) up to the second. H100,
# one layer (`scripts/attention_probe.py own`, CUDA-core vs tensor-core ms): 1,024 rows of ~11
# pages 0.264 vs 0.337; 704 rows of 1-33 pages 0.284 vs 0.301, 24-32 0.447 vs 0.459, 40-48
# 0.701 vs 0.704; 140 rows of 7-130 pages 0.336 vs 0.234.
CUDA_CORE_DECODE_MAX_PAGES = 24
CUDA_CORE_DECODE_MAX_PAGES_LARGE_BATCH = (512, 48)  # (rows from, mean pages up to)

WORKSPACE_BYTES = 768 << 20  # split-kv partials of a 1024-row decode step need ~320 MB
FLASHINFER_WRAPPER_BYTES = 8 << 20  # FlashInfer gives every wrapper a schedule buffer of this size on the device


# One kernel's share of a step's own-pages attention: the wrapper, and the query tokens it takes
# (a decode wrapper the step's leading single-token rows, a prefill wrapper the rest).
AttentionPart = tuple[object, slice]


def decode_uses_tensor_cores(num_pages: int, rows: int, cuda_core_max_pages: int = CUDA_CORE_DECODE_MAX_PAGES
                             ) -> bool:
    """Whether decoding `rows` rows over `num_pages` KV pages in all runs FlashInfer's tensor-core
    kernel (long page lists) rather than its CUDA-core one."""
    large_rows, large_pages = CUDA_CORE_DECODE_MAX_PAGES_LARGE_BATCH
    cuda_cores = num_pages <= cuda_core_max_pages * rows or (rows >= large_rows and num_pages <= large_pages * rows)
    return not cuda_cores


def _pin_flashinfer_query_range(length: int) -> None:
    """Pin the host arange (one query per row) that FlashInfer 0.6.14's eager decode plan() copies
    to the device: it comes from a cache of pageable tensors, and a pageable copy waits for the
    whole stream, so the GPU would drain while the host plans a step that also prefills."""
    from flashinfer import utils

    size = 1 << (length - 1).bit_length()  # the cache's key: the next power of two
    key = (f"range_{size}", "cpu")
    cached = utils._cache_buf.get(key)
    if cached is None or not cached.is_pinned():
        utils._cache_buf[key] = torch.arange(size, dtype=torch.int32).pin_memory()


def kv_token_counts(kv_indptr: np.ndarray, kv_last_page_len: np.ndarray, page_size: int) -> np.ndarray:
    """KV tokens per row (int32) of a page-table CSR: its full pages plus its last page's tokens."""
    return (np.maximum(np.diff(kv_indptr) - 1, 0) * page_size + kv_last_page_len).astype(np.int32)


def _prefill_lengths(qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor,
                     page_size: int) -> dict[str, object]:
    """What a prefill wrapper's plan() would otherwise derive itself: KV tokens per request (pinned)
    and the longest query. Its own derivation copies the lengths to the device from pageable
    memory, which waits for the whole stream, so the GPU would drain while the host plans."""
    kv_lens = kv_token_counts(kv_indptr.numpy(), kv_last_page_len.numpy(), page_size)
    return dict(seq_lens=torch.from_numpy(kv_lens).pin_memory(),
                max_token_per_sequence=int(np.diff(qo_indptr.numpy()).max()))


class DecodeLevels:
    """Device buffers that the shared-level kernels read for a decode step (a `LevelWork`) and the
    partials they write. Fixed in size, so CUDA graphs replay them; `fill` loads each step's work."""

    def __init__(self, max_tokens: int, max_pages: int, max_levels: int, num_q_heads: int, head_dim: int,
                 device: torch.device) -> None:
        for name, (shape, dtype) in self._buffers(max_tokens, max_pages, max_levels, num_q_heads, head_dim).items():
            setattr(self, name, torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def _buffers(max_tokens: int, max_pages: int, max_levels: int, num_q_heads: int, head_dim: int
                 ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of each buffer; an item has at least one token, so a level has
        at most max_tokens items."""
        return dict(work=((max_levels * max_tokens, 5), torch.int32), num_items=((1,), torch.int32),
                    pages=((max(max_pages, 1),), torch.int32), counts=((max_tokens,), torch.int32),
                    partial_out=((max_levels, max_tokens, num_q_heads, head_dim), torch.float32),
                    partial_lse=((max_levels, max_tokens, num_q_heads), torch.float32))

    @staticmethod
    def bytes_needed(max_tokens: int, max_pages: int, max_levels: int, num_q_heads: int, head_dim: int) -> int:
        buffers = DecodeLevels._buffers(max_tokens, max_pages, max_levels, num_q_heads, head_dim).values()
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in buffers)

    @classmethod
    def for_work(cls, work: LevelWork, num_levels: int, num_q_heads: int, head_dim: int,
                 device: torch.device) -> DecodeLevels:
        """Buffers just large enough for one eager step's work, filled."""
        levels = cls(len(work.counts), len(work.pages), num_levels, num_q_heads, head_dim, device)
        levels.fill(work, len(work.counts))
        return levels

    def fill(self, work: LevelWork, num_tokens: int) -> None:
        """Load a step's work; tokens from len(work.counts) to num_tokens (padding) share nothing."""
        pad = np.zeros(num_tokens - len(work.counts), dtype=np.int32)
        fill_from_host([(self.num_items, np.array([len(work.work)], dtype=np.int32)), (self.work, work.work),
                        (self.counts, np.concatenate([work.counts, pad])), (self.pages, work.pages)])

    def merge_into(self, q: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor,
                   lse: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Attend q to every level's pages and fold the results into out (own pages; lse base 2)."""
        kernels = gpu_kernels("shared_level", q)
        kernels.shared_level_attention(q, *cache, self.work, self.num_items, self.pages, self.partial_out,
                                       self.partial_lse, k_scale=k_scale, v_scale=v_scale)
        kernels.merge_partials_(out, lse, self.partial_out, self.partial_lse, self.counts[:q.shape[0]])


class FlashInferBackend(AttentionBackend):
    """prefill_backend: FlashInfer's backend for the paged prefill wrappers ("auto": FA3 on Hopper
    where the dtypes allow, "fa2", "fa3"). kv_dtype: the pages' dtype; an fp8 cache runs FlashInfer's
    fp8-KV kernels (bf16 queries, pages dequantized in the kernel, k_scale / v_scale passed to run)."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, max_levels: int = 0, prefill_backend: str = "auto",
                 kv_dtype: torch.dtype | None = None) -> None:
        import flashinfer  # imported here: CPU installs never need it

        self._flashinfer = flashinfer
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        if self.kv_dtype != dtype and prefill_backend == "fa3":
            raise ValueError("prefill_backend='fa3' runs queries and KV of one dtype: with an fp8 KV cache use "
                             "prefill_backend='auto' or 'fa2'")
        self.prefill_backend = prefill_backend
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._prefill = self._prefill_wrapper()
        self._decode = {tensor_cores: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=tensor_cores) for tensor_cores in (True, False)}
        self._active: list[AttentionPart] = []  # this step's own-pages attention (see prepare)
        # One prefill wrapper per shared level of cascade plans: max_levels made now (their schedule
        # buffers then count among what the KV pool's sizing finds in use), deeper ones as needed.
        self._levels: list = [self._prefill_wrapper() for _ in range(max_levels)]
        self._active_levels: list[tuple[object, torch.Tensor]] | DecodeLevels = []  # this step's levels (see run)
        self._staged: dict[int, torch.cuda.Event] = {}  # per wrapper: when its last plan's copies are queued
        # One device schedule buffer for all CUDA-graph wrappers (FlashInfer gives each its own):
        # a step plans one of them and replays its graph, in stream order, so they never overlap.
        self._graph_schedule = torch.empty(FLASHINFER_WRAPPER_BYTES, dtype=torch.uint8, device=device)

    def _prefill_wrapper(self):
        return self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD",
                                                                    backend=self.prefill_backend)

    def prepare(self, meta: AttentionMetadata, kv_cache: KVCache) -> None:
        """Plan the step's own-pages attention and its levels.

        The step's leading single-token rows (all of a decode step; the decoding sequences the
        engine puts first in a step that also prefills) go through a decode kernel: a prefill
        kernel gives each such row a whole tile of queries, about five times the decode kernel's
        time per row. The other rows go through the causal prefill kernel.
        """
        plan = meta.cascade
        kv_indptr, kv_indices = (meta.kv_indptr, meta.kv_indices) if plan is None else (plan.own_indptr, plan.own_indices)
        last_page_len = meta.kv_last_page_len
        decoded = meta.num_seqs if meta.is_decode else int(np.argmax(np.diff(meta.query_start.numpy()) != 1))
        self._active = []
        if decoded:
            pages = int(kv_indptr[decoded])
            wrapper = self._decode[decode_uses_tensor_cores(pages, decoded)]
            self.plan_decode(wrapper, kv_indptr[:decoded + 1], kv_indices[:pages], last_page_len[:decoded], kv_cache)
            self._active.append((wrapper, slice(0, decoded)))
        if decoded < meta.num_seqs:
            query_start, kv_indptr = meta.query_start[decoded:] - decoded, kv_indptr[decoded:]
            kv_indices, kv_indptr = kv_indices[int(kv_indptr[0]):], kv_indptr - kv_indptr[0]
            self._plan(self._prefill, query_start, kv_indptr, kv_indices, last_page_len[decoded:],
                       self.num_q_heads, self.num_kv_heads, self.head_dim, kv_cache.page_size,
                       causal=True, q_data_type=self.dtype, kv_data_type=kv_cache.k.dtype,
                       **_prefill_lengths(query_start, kv_indptr, last_page_len[decoded:], kv_cache.page_size))
            self._active.append((self._prefill, slice(decoded, None)))
        self._active_levels = []
        if meta.is_decode and plan is not None:
            self._active_levels = DecodeLevels.for_work(plan.work, len(plan.levels), self.num_q_heads, self.head_dim,
                                                        self._workspace.device)
            return
        for depth, level in enumerate(plan.levels if plan is not None else ()):
            if depth == len(self._levels):
                self._levels.append(self._prefill_wrapper())
            self.plan_level(self._levels[depth], level.qo_indptr, level.kv_indptr, level.kv_indices,
                            level.kv_last_page_len, kv_cache)
            self._active_levels.append((self._levels[depth], level.member))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return self.run(self._active, layer, q, k, v, kv_cache, meta.slot_mapping, self._active_levels)

    # ---------------------------------------------------------------- pieces the CUDA graphs reuse
    def graph_decode_wrapper(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor,
                             tensor_cores: bool = True):
        """A decode wrapper whose plan lands in these fixed device buffers (graph-capturable):
        FlashInfer's tensor-core kernel, or its CUDA-core one (faster for short page lists)."""
        wrapper = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last_page_len)
        wrapper._int_workspace_buffer = self._graph_schedule
        return wrapper

    def plan_level(self, wrapper, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                   kv_last_page_len: torch.Tensor, kv_cache: KVCache) -> None:
        """Plan one shared level of a prefill step: every request sees all of its pages (non-causal)."""
        self._plan(wrapper, qo_indptr, kv_indptr, kv_indices, kv_last_page_len, self.num_q_heads, self.num_kv_heads,
                   self.head_dim, kv_cache.page_size, causal=False, q_data_type=self.dtype,
                   kv_data_type=kv_cache.k.dtype,
                   **_prefill_lengths(qo_indptr, kv_indptr, kv_last_page_len, kv_cache.page_size))

    def plan_decode(self, wrapper, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    kv_last_page_len: torch.Tensor, kv_cache: KVCache) -> None:
        if wrapper.is_cuda_graph_enabled:  # it would copy host indices into its buffer with a blocking copy
            kv_indices = to_device(kv_indices, self._workspace.device)
        else:
            _pin_flashinfer_query_range(kv_last_page_len.shape[0] + 1)
        self._plan(wrapper, kv_indptr, kv_indices, kv_last_page_len, self.num_q_heads, self.num_kv_heads,
                   self.head_dim, kv_cache.page_size, q_data_type=self.dtype, kv_data_type=kv_cache.k.dtype)

    def _plan(self, wrapper, *index_tensors_and_shape, **options) -> None:
        """wrapper.plan, safe while the host runs a step ahead of the GPU (see `_staged_plan`).

        Index tensors are pinned so their copies never wait for the stream.
        """
        args = [a.pin_memory() if isinstance(a, torch.Tensor) and a.device.type == "cpu" and not a.is_pinned() else a
                for a in index_tensors_and_shape]
        self._staged_plan(wrapper, lambda: wrapper.plan(*args, **options))

    def _staged_plan(self, wrapper, plan: Callable[[], object]) -> None:
        """Run a plan of `wrapper` once the GPU has taken its previous one.

        A plan stages its schedule in the wrapper's pinned buffer, which its next plan rewrites,
        so that one first waits until the GPU has taken the previous copy (a step earlier: by then
        it nearly always has). Waiting per wrapper matters: a step plans several wrappers (cascade
        levels), and waiting on this step's own earlier plan would wait for the GPU to reach this step.
        """
        staged = self._staged.get(id(wrapper))
        if staged is not None:
            staged.synchronize()
        plan()
        staged = torch.cuda.Event()
        staged.record()
        self._staged[id(wrapper)] = staged

    def replan_graph_wrapper(self, wrapper, kv_indptr: torch.Tensor, kv_lens: torch.Tensor, page_size: int) -> None:
        """Plan a CUDA-graph decode wrapper (planned once through `plan` at capture) for a step's
        lengths, its index buffers already filled on the device by the caller.

        FlashInfer's `plan` re-derives on the host what the caller already knows, with a Python
        `max` over a tensor (about 3 ms per call at 1,000 rows). For a graph wrapper only the
        kernel schedule changes between steps, so this runs FlashInfer's scheduler directly on
        host int32 tensors: kv_indptr [B + 1], kv_lens [B] (KV tokens per row). `check_replan`
        proves at capture that both give one schedule.
        """
        self._staged_plan(wrapper, lambda: self._schedule(wrapper, kv_indptr, kv_lens, page_size))

    def _schedule(self, wrapper, kv_indptr: torch.Tensor, kv_lens: torch.Tensor, page_size: int) -> None:
        """FlashInfer 0.6.14's scheduler call as its decode wrapper's plan() makes it in CUDA-graph
        mode: the tensor-core kernel is its fa2 prefill kernel with one query per row (fp8 would
        pick another backend, which `check_replan` would refuse), the CUDA-core kernel has a
        scheduler of its own. The wrapper keeps the returned plan info."""
        rows = kv_lens.shape[0]
        buffers = (wrapper._float_workspace_buffer, wrapper._int_workspace_buffer,
                   wrapper._pin_memory_int_workspace_buffer)
        if wrapper.use_tensor_cores:
            one_query_each = torch.arange(rows + 1, dtype=torch.int32)
            wrapper._plan_info = wrapper._cached_module.plan(
                *buffers, one_query_each, kv_indptr, kv_lens, rows, rows, self.num_q_heads, self.num_kv_heads,
                page_size, True, self.head_dim, self.head_dim, False, -1,
                -1, False, 0)  # not causal, no window; no fixed split size, split-kv allowed, no co-located CTAs
        else:
            wrapper._plan_info = wrapper._cached_module.plan(
                *buffers, kv_indptr, rows, self.num_q_heads, self.num_kv_heads, page_size, True, -1, 0.0,
                self.head_dim, self.head_dim, torch.empty(0, dtype=self.dtype), torch.empty(0, dtype=self.kv_dtype))

    def check_replan(self, wrapper, kv_indptr: torch.Tensor, kv_lens: torch.Tensor, page_size: int) -> None:
        """Raise unless `replan_graph_wrapper` reproduces the schedule of the wrapper's last `plan`
        (called with these lengths): guards against a FlashInfer whose internals moved."""
        torch.cuda.synchronize()
        official = list(wrapper._plan_info)
        self._schedule(wrapper, kv_indptr, kv_lens, page_size)
        torch.cuda.synchronize()
        if list(wrapper._plan_info) != official:
            raise RuntimeError(f"FlashInfer {self._flashinfer.__version__}: direct re-planning of CUDA-graph "
                               "wrappers differs from plan(); this forkserve needs flashinfer-python 0.6.14")

    def run(self, parts: Sequence[AttentionPart], layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            kv_cache: KVCache, slot_mapping: torch.Tensor,
            levels: Sequence[tuple[object, torch.Tensor]] | DecodeLevels = ()) -> torch.Tensor:
        """Store the new K/V, attend to the own pages with each part's wrapper, and merge in the
        shared levels: a decode step's `DecodeLevels`, or a prefill step's (level wrapper, member
        mask) pairs."""
        write_kv(layer, k, v, kv_cache, slot_mapping)
        cache = (kv_cache.k[layer], kv_cache.v[layer])
        scales = dict(k_scale=kv_cache.k_scale, v_scale=kv_cache.v_scale) if kv_cache.quantized else {}
        q = q.contiguous()
        # Outputs given uninitialised: FlashInfer's prefill wrappers zero-fill the ones they allocate
        # (a full write per layer), and every row of a plan has keys, so the kernels write all of it.
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if levels else None
        for wrapper, rows in parts:
            if lse is None:
                wrapper.run(q[rows], cache, out=out[rows], **scales)
            else:
                wrapper.run(q[rows], cache, out=out[rows], lse=lse[rows], return_lse=True, **scales)
        if not levels:
            return out
        if isinstance(levels, DecodeLevels):
            levels.merge_into(q, cache, out, lse, kv_cache.k_scale, kv_cache.v_scale)
            return out
        for level_wrapper, member in levels:
            part, part_lse = level_wrapper.run(q, cache, return_lse=True, out=torch.empty_like(q), **scales)
            self._flashinfer.merge_state_in_place(out, lse, part, part_lse, mask=member)
        return out
