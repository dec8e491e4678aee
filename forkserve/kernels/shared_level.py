"""Triton kernels for the shared levels of cascade attention on the GPU.

In a decode step a shared level is a few dozen groups, each some 32-64 queries (one per sequence
under a tree node) over the node's pages, non-causal. FlashInfer's FA3 ragged prefill kernel,
bound to CUDA-graph buffers, takes about twice as long for these shapes as this kernel (H100, one
layer: 21 groups x 32 queries x 62 pages 0.108 vs 0.059 ms; 16 x 64 x 125 pages 0.129 vs 0.102
ms; `scripts/attention_probe.py triton`). One program handles 32 queries x the query heads of
one KV head (a 128-row tile) over a group's pages; splitting the pages across programs measured
no faster at these shapes. All levels of a step run in one launch, and there are no filler
requests: work items list only groups.

Each item writes a partial output with its log-sum-exp into a slot per token; one merge kernel
then folds every token's partials into the output of its own-pages attention. Log-sum-exp is in
base 2, as FlashInfer returns it, so the two compose. Prefill steps keep FlashInfer's kernel for
their levels: there the work is compute-bound, where FA3 is faster.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from forkserve.kernels import LEVEL_TILE_TOKENS

KEYS_PER_BLOCK = 64  # keys per inner iteration
PROGRAMS_PER_KV_HEAD = 128  # a fixed grid (CUDA graphs); each program takes every this-many-th work item


@triton.jit
def _shared_level_kernel(q_ptr, k_ptr, v_ptr, work_ptr, num_items_ptr, pages_ptr, out_ptr, lse_ptr,
                         q_token_stride, q_head_stride, kv_page_stride, kv_token_stride, kv_head_stride,
                         out_slot_stride, out_token_stride, lse_slot_stride, lse_token_stride, scale_log2, v_scale,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                         TOKENS: tl.constexpr, BLOCK_N: tl.constexpr):
    kv_head = tl.program_id(1)
    rows = tl.arange(0, TOKENS * GROUP)
    head = kv_head * GROUP + rows % GROUP
    dims = tl.arange(0, HEAD_DIM)
    num_items = tl.load(num_items_ptr)
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        first_token = tl.load(work_ptr + item * 5)
        num_tokens = tl.load(work_ptr + item * 5 + 1)
        first_page = tl.load(work_ptr + item * 5 + 2)
        num_keys = tl.load(work_ptr + item * 5 + 3) * PAGE
        slot = tl.load(work_ptr + item * 5 + 4).to(tl.int64)
        token = (first_token + rows // GROUP).to(tl.int64)
        row_ok = rows // GROUP < num_tokens
        q = tl.load(q_ptr + token[:, None] * q_token_stride + head[:, None] * q_head_stride + dims[None, :],
                    mask=row_ok[:, None], other=0.0)
        m = tl.full([TOKENS * GROUP], float("-inf"), dtype=tl.float32)
        total = tl.zeros([TOKENS * GROUP], dtype=tl.float32)
        acc = tl.zeros([TOKENS * GROUP, HEAD_DIM], dtype=tl.float32)
        for start in range(0, num_keys, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < num_keys
            page = tl.load(pages_ptr + first_page + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
            offsets = page * kv_page_stride + (keys % PAGE) * kv_token_stride + kv_head * kv_head_stride
            # fp8 pages are widened to the queries' dtype here; their scales sit in scale_log2 and v_scale
            k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k)) * scale_log2
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=key_ok[:, None], other=0.0).to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out_rows = slot * out_slot_stride + token * out_token_stride + head * HEAD_DIM
        tl.store(out_ptr + out_rows[:, None] + dims[None, :], acc * (v_scale / total[:, None]), mask=row_ok[:, None])
        tl.store(lse_ptr + slot * lse_slot_stride + token * lse_token_stride + head, m + tl.log2(total), mask=row_ok)


def shared_level_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, work: torch.Tensor,
                           num_items: torch.Tensor, pages: torch.Tensor, partial_out: torch.Tensor,
                           partial_lse: torch.Tensor, block_n: int = KEYS_PER_BLOCK, num_warps: int = 4,
                           num_stages: int = 2, tile_tokens: int = LEVEL_TILE_TOKENS, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> None:
    """Every work item's queries over its pages, into its slot of the partials (`LevelWork`).

    q: [T, Hq, D]; k_cache/v_cache: one layer's [pages, page_size, Hkv, D]; work: [>= W, 5] int32
    whose first num_items[0] rows are the items (read on the device, so fixed buffers serve CUDA
    graphs); pages: int32 page list the items index; partial_out: [S, T, Hq, D] fp32, partial_lse:
    [S, T, Hq] fp32 (base 2), written where an item's tokens and slot say. block_n, num_warps and
    num_stages are the kernel's tuning (`scripts/attention_probe.py sweep` times them), tile_tokens
    the most tokens an item may have (the work list's cut). An fp8 cache (float8_e4m3fn pages)
    is read as stored values times k_scale / v_scale.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert partial_out.is_contiguous() and partial_lse.is_contiguous()
    _shared_level_kernel[(PROGRAMS_PER_KV_HEAD, num_kv_heads)](
        q, k_cache, v_cache, work, num_items, pages, partial_out, partial_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        partial_out.stride(0), partial_out.stride(1), partial_lse.stride(0), partial_lse.stride(1),
        head_dim ** -0.5 * 1.4426950408889634 * k_scale, v_scale, GROUP=q.shape[1] // num_kv_heads, HEAD_DIM=head_dim,
        PAGE=k_cache.shape[1], TOKENS=tile_tokens, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def _merge_partials_kernel(out_ptr, lse_ptr, partial_out_ptr, partial_lse_ptr, count_ptr, out_token_stride,
                           lse_token_stride, partial_slot_stride, partial_lse_slot_stride,
                           HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + token)
    if count == 0:
        return
    heads = tl.arange(0, HEADS)
    dims = tl.arange(0, HEAD_DIM)
    cell = heads[:, None] * HEAD_DIM + dims[None, :]
    out = tl.load(out_ptr + token * out_token_stride + cell).to(tl.float32)
    lse = tl.load(lse_ptr + token * lse_token_stride + heads)
    for slot in range(count):
        part = tl.load(partial_out_ptr + slot * partial_slot_stride + token * HEADS * HEAD_DIM + cell)
        part_lse = tl.load(partial_lse_ptr + slot * partial_lse_slot_stride + token * HEADS + heads)
        top = tl.maximum(lse, part_lse)
        w = tl.exp2(lse - top)
        w_part = tl.exp2(part_lse - top)
        out = (out * w[:, None] + part * w_part[:, None]) / (w + w_part)[:, None]
        lse = top + tl.log2(w + w_part)
    tl.store(out_ptr + token * out_token_stride + cell, out.to(out_ptr.dtype.element_ty))


def merge_partials_(out: torch.Tensor, lse: torch.Tensor, partial_out: torch.Tensor, partial_lse: torch.Tensor,
                    counts: torch.Tensor) -> None:
    """Fold each token's first counts[t] partials into out[t] (its own-pages attention, lse base 2), in place.

    out: [T, Hq, D] (model dtype); lse: [T, Hq] fp32; counts: [T] int32 (0: the token shares nothing).
    """
    tokens, heads, head_dim = out.shape
    assert out.stride(2) == 1 and out.stride(1) == head_dim and lse.stride(1) == 1
    assert partial_out.is_contiguous() and partial_lse.is_contiguous()
    _merge_partials_kernel[(tokens,)](out, lse, partial_out, partial_lse, counts, out.stride(0), lse.stride(0),
                                      partial_out.stride(0), partial_lse.stride(0), HEADS=heads, HEAD_DIM=head_dim,
                                      num_warps=4)
