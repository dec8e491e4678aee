"""FlashInfer paged attention: the GPU path.

A step is planned once (on host tensors, so planning never waits for the GPU) and every layer
reuses the plan. Pure decode steps use the decode kernel (tensor cores for grouped-query heads);
steps with prefill chunks use the ragged-query prefill kernel over paged KV.
"""
from __future__ import annotations

import torch

from forkserve.attention.base import AttentionBackend, AttentionMetadata, write_kv
from forkserve.engine.pages import KVCache

WORKSPACE_BYTES = 256 << 20


class FlashInferBackend(AttentionBackend):
    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        import flashinfer  # imported here: CPU installs never need it

        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype = dtype
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        self._active = self._decode

    def prepare(self, meta: AttentionMetadata, kv_cache: KVCache) -> None:
        heads = (self.num_q_heads, self.num_kv_heads, self.head_dim, meta.page_size)
        if meta.is_decode:
            self._decode.plan(meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, *heads,
                              q_data_type=self.dtype, kv_data_type=kv_cache.k.dtype)
            self._active = self._decode
        else:
            self._prefill.plan(meta.query_start, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len,
                               *heads, causal=True, q_data_type=self.dtype, kv_data_type=kv_cache.k.dtype)
            self._active = self._prefill

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(layer, k, v, kv_cache, meta.slot_mapping)
        return self._active.run(q.contiguous(), (kv_cache.k[layer], kv_cache.v[layer]))
