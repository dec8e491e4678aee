"""FlashInfer paged attention: the GPU path.

A step is planned once (on host tensors, so planning never waits for the GPU) and every layer
reuses the plan. Pure decode steps use the decode kernel (tensor cores for grouped-query heads);
steps with prefill chunks use the ragged-query prefill kernel over paged KV. Decode wrappers
bound to fixed buffers serve the CUDA graphs (see forkserve/cuda_graphs.py).
"""
from __future__ import annotations

import torch

from forkserve.attention.base import AttentionBackend, AttentionMetadata, write_kv
from forkserve.engine.pages import KVCache
from forkserve.transfer import to_device

WORKSPACE_BYTES = 768 << 20  # split-kv partials of a 1024-row decode step need ~320 MB


class FlashInferBackend(AttentionBackend):
    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        import flashinfer  # imported here: CPU installs never need it

        self._flashinfer = flashinfer
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype = dtype
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", use_tensor_cores=True)
        self._active = self._decode
        self._staged: torch.cuda.Event | None = None  # when the last plan's host-to-device copies are queued

    def prepare(self, meta: AttentionMetadata, kv_cache: KVCache) -> None:
        if meta.is_decode:
            self.plan_decode(self._decode, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, kv_cache)
            self._active = self._decode
        else:
            self._plan(self._prefill, meta.query_start, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
                       self.num_q_heads, self.num_kv_heads, self.head_dim, kv_cache.page_size,
                       causal=True, q_data_type=self.dtype, kv_data_type=kv_cache.k.dtype)
            self._active = self._prefill

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        return self.run(self._active, layer, q, k, v, kv_cache, meta.slot_mapping)

    # ---------------------------------------------------------------- pieces the CUDA graphs reuse
    def graph_decode_wrapper(self, indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor):
        """A decode wrapper whose plan lands in these fixed device buffers (graph-capturable)."""
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=indptr,
            paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last_page_len)

    def plan_decode(self, wrapper, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                    kv_last_page_len: torch.Tensor, kv_cache: KVCache) -> None:
        if wrapper.is_cuda_graph_enabled:  # it would copy host indices into its buffer with a blocking copy
            kv_indices = to_device(kv_indices, self._workspace.device)
        self._plan(wrapper, kv_indptr, kv_indices, kv_last_page_len, self.num_q_heads, self.num_kv_heads,
                   self.head_dim, kv_cache.page_size, q_data_type=self.dtype, kv_data_type=kv_cache.k.dtype)

    def _plan(self, wrapper, *index_tensors_and_shape, **options) -> None:
        """wrapper.plan, safe while the host runs a step ahead of the GPU.

        Index tensors are pinned so their copies never wait for the stream. A plan stages its
        schedule in a pinned buffer that the next plan rewrites, so that one first waits until
        the GPU has taken the previous plan's copy (by then it nearly always has).
        """
        args = [a.pin_memory() if isinstance(a, torch.Tensor) and a.device.type == "cpu" and not a.is_pinned() else a
                for a in index_tensors_and_shape]
        if self._staged is not None:
            self._staged.synchronize()
        wrapper.plan(*args, **options)
        self._staged = torch.cuda.Event()
        self._staged.record()

    @staticmethod
    def run(wrapper, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
            slot_mapping: torch.Tensor) -> torch.Tensor:
        write_kv(layer, k, v, kv_cache, slot_mapping)
        return wrapper.run(q.contiguous(), (kv_cache.k[layer], kv_cache.v[layer]))
