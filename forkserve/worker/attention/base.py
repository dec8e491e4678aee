"""The attention backend interface: one step's flat token batch attends to paged KV."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from forkserve.worker.attention.cascade import CascadePlan
from forkserve.worker.kv_cache import KVCache
from forkserve.model.layers import fused_kernels_for


@dataclass
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat batch and in the page pool.

    Page lists are CSR host tensors (what FlashInfer's planners take, without a device sync);
    only slot_mapping lives on the device. Query ``i`` of sequence ``b`` sits at position
    ``context_lens[b] - query_len(b) + i`` and attends to every cached position up to its own.
    """

    query_start: torch.Tensor  # [B + 1] int32 host, cumulative query lengths
    kv_indptr: torch.Tensor  # [B + 1] int32 host, sequence b's pages: kv_indices[kv_indptr[b]:kv_indptr[b+1]]
    kv_indices: torch.Tensor  # [total pages] int32 host, page tables concatenated
    kv_last_page_len: torch.Tensor  # [B] int32 host, tokens in each last page (1..page_size)
    context_lens: list[int]  # tokens in KV after this step
    slot_mapping: torch.Tensor  # [T] int64 on the device, page * page_size + offset of each new token
    page_size: int
    cascade: CascadePlan | None = None  # shared-prefix levels, when the step's sharing is worth them

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (a pure decode step)."""
        return self.num_tokens == self.num_seqs


class AttentionBackend(ABC):
    """Writes a step's new K/V into the cache and computes attention for its queries."""

    def prepare(self, meta: AttentionMetadata, kv_cache: KVCache) -> None:
        """Per-step planning shared by all layers (kernels that need it override this)."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (RoPE applied) -> [T, Hq, D]."""


def write_kv(layer: int, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their page slots."""
    fused = fused_kernels_for(k)
    if fused is not None:
        fused.store_kv(k, v, kv_cache.k[layer], kv_cache.v[layer], slot_mapping, kv_cache.k_scale, kv_cache.v_scale)
        return
    num_heads, head_dim = k.shape[1], k.shape[2]
    for new, pages, scale in ((k, kv_cache.k, kv_cache.k_scale), (v, kv_cache.v, kv_cache.v_scale)):
        rows = kv_cache.quantize(new, scale)
        if kv_cache.quantized:  # fp8 has few indexing kernels: scatter the bytes
            pages, rows = pages.view(torch.uint8), rows.view(torch.uint8)
        pages[layer].view(-1, num_heads, head_dim)[slot_mapping] = rows
