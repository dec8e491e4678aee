"""Pure-torch paged attention: the CPU path and the oracle that GPU kernels are tested against.

An fp8 KV cache is emulated exactly: pages hold float8_e4m3fn, dequantized (times the scale) as they are read."""
from __future__ import annotations

import math

import torch

from forkserve.worker.attention.base import AttentionBackend, AttentionMetadata, write_kv
from forkserve.worker.attention.cascade import CascadePlan, merge_partials
from forkserve.worker.kv_cache import KVCache


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           first_query_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries at positions first_query_pos.. over keys at 0..len(keys)-1.

    q: [Q, Hq, D], keys/values: [K, Hkv, D]; grouped-query heads share a KV head. Math in fp32.
    Returns the output [Q, Hq, D] (fp32) and its log-sum-exp [Q, Hq] (natural log), which is
    what merging with attention over other keys needs. first_query_pos >= K - 1 sees every key.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    group = num_q_heads // keys.shape[1]
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) / math.sqrt(head_dim)
    query_pos = torch.arange(q.shape[0]).unsqueeze(1) + first_query_pos
    key_pos = torch.arange(keys.shape[0]).unsqueeze(0)
    scores = scores.masked_fill((key_pos > query_pos).to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse.unsqueeze(-1)), values)
    return out, lse.transpose(0, 1)


def gather_pages(cache_layer: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of a sequence, from its pages: [length, H, D]."""
    rows = cache_layer[pages]  # [num_pages, page_size, H, D]
    return rows.reshape(-1, rows.shape[2], rows.shape[3])[:length]


class ReferenceBackend(AttentionBackend):
    """One sequence (or shared group) at a time, gathering its pages: slow, obviously correct, runs anywhere.

    With a cascade plan it computes what the GPU backend does: each shared level's groups, each
    sequence's own tail, merged by log-sum-exp, so CPU runs exercise the same plans.
    """

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(layer, k, v, kv_cache, meta.slot_mapping)
        plan = meta.cascade
        kv_indptr, kv_indices = (meta.kv_indptr, meta.kv_indices) if plan is None else (plan.own_indptr, plan.own_indices)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        starts, indptr, all_pages = meta.query_start.tolist(), kv_indptr.tolist(), meta.kv_indptr.tolist()
        kv_indices = kv_indices.to(q.device)
        for b, context_len in enumerate(meta.context_lens):
            pages = kv_indices[indptr[b]:indptr[b + 1]]
            own_len = context_len - (all_pages[b + 1] - all_pages[b] - len(pages)) * meta.page_size
            rows = slice(starts[b], starts[b + 1])
            keys = kv_cache.dequantize(gather_pages(kv_cache.k[layer], pages, own_len), kv_cache.k_scale)
            values = kv_cache.dequantize(gather_pages(kv_cache.v[layer], pages, own_len), kv_cache.v_scale)
            out[rows], lse[rows] = attend(q[rows], keys, values, own_len - (starts[b + 1] - starts[b]))
        if plan is not None:
            self._merge_shared_levels(layer, q, kv_cache, plan, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def _merge_shared_levels(layer: int, q: torch.Tensor, kv_cache: KVCache, plan: CascadePlan,
                             out: torch.Tensor, lse: torch.Tensor) -> None:
        """Each level's requests attend to their pages (all visible), merged into out/lse in place
        where `member` says so (filler requests are computed and dropped, as on the GPU)."""
        for level in plan.levels:
            qo, kv_ptr, last = level.qo_indptr.tolist(), level.kv_indptr.tolist(), level.kv_last_page_len.tolist()
            kv_indices = level.kv_indices.to(q.device)
            for r in range(level.num_requests):
                rows = slice(qo[r], qo[r + 1])
                pages = kv_indices[kv_ptr[r]:kv_ptr[r + 1]]
                length = (len(pages) - 1) * kv_cache.page_size + last[r]
                keys = kv_cache.dequantize(gather_pages(kv_cache.k[layer], pages, length), kv_cache.k_scale)
                values = kv_cache.dequantize(gather_pages(kv_cache.v[layer], pages, length), kv_cache.v_scale)
                part, part_lse = attend(q[rows], keys, values, length)
                merged, merged_lse = merge_partials(out[rows], lse[rows], part, part_lse)
                member = level.member[rows]
                out[rows] = torch.where(member[:, None, None], merged, out[rows])
                lse[rows] = torch.where(member[:, None], merged_lse, lse[rows])
