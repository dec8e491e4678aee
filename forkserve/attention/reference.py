"""Pure-torch paged attention: the CPU path and the oracle that GPU kernels are tested against."""
from __future__ import annotations

import math

import torch

from forkserve.attention.base import AttentionBackend, AttentionMetadata, write_kv
from forkserve.engine.pages import KVCache


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_query_pos: int) -> torch.Tensor:
    """Causal attention of queries at positions first_query_pos.. over keys at 0..len(keys)-1.

    q: [Q, Hq, D], keys/values: [K, Hkv, D]; grouped-query heads share a KV head. Math in fp32.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    group = num_q_heads // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) / math.sqrt(head_dim)
    query_pos = torch.arange(q.shape[0]).unsqueeze(1) + first_query_pos
    key_pos = torch.arange(keys.shape[0]).unsqueeze(0)
    scores = scores.masked_fill((key_pos > query_pos).to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)


def gather_pages(cache_layer: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of a sequence, from its pages: [length, H, D]."""
    rows = cache_layer[pages]  # [num_pages, page_size, H, D]
    return rows.reshape(-1, rows.shape[2], rows.shape[3])[:length]


class ReferenceBackend(AttentionBackend):
    """One sequence at a time, gathering its pages: slow, obviously correct, runs anywhere."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(layer, k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        starts = meta.query_start.tolist()
        kv_indptr = meta.kv_indptr.tolist()
        kv_indices = meta.kv_indices.to(q.device)
        for b, context_len in enumerate(meta.context_lens):
            pages = kv_indices[kv_indptr[b]:kv_indptr[b + 1]]
            keys = gather_pages(kv_cache.k[layer], pages, context_len)
            values = gather_pages(kv_cache.v[layer], pages, context_len)
            query_len = starts[b + 1] - starts[b]
            out[starts[b]:starts[b + 1]] = attend(q[starts[b]:starts[b + 1]], keys, values, context_len - query_len)
        return out
