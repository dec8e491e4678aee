"""Shared-prefix (cascade) attention plans: read each shared prefix once per step for all its queries.

The core says which of a step's rows share which leading pages (a `Sharing`, from the prefix
tree: engine/sharing.py). Each kept depth of sharing is a *level*: all queries of all rows of
one group attend to the group's pages in one batched, non-causal pass (Hydragen; the shared KV
precedes every query). What is left of each row (its own tail, plus any shared run too small to
pay for a pass) is attended causally as plain attention would. Every level returns partial
outputs with their log-sum-exp, and `merge_partials` combines them exactly.

A level is laid out for FlashInfer's ragged kernels (prefill steps on the GPU) and the reference
backend as a tiling of the step's whole flat batch into ragged requests: each run of consecutive
tokens of one group is a request over the group's pages, and each run of tokens in no group of
that level is a *filler* request over the scratch page, left out of the merge (`member`). Decode
steps on the GPU take the same levels as `LevelWork`: the groups' runs cut into work items of at
most LEVEL_TILE_TOKENS tokens, all levels in one list, no fillers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from forkserve.kernels import LEVEL_TILE_TOKENS
from forkserve.transfer import to_device
from forkserve.worker.plan import Sharing


@dataclass
class CascadeLevel:
    """One depth of sharing, as ragged requests tiling the step's tokens: request r is the queries
    q[qo_indptr[r]:qo_indptr[r+1]] over pages kv_indices[kv_indptr[r]:kv_indptr[r+1]] (the last
    holding kv_last_page_len[r] tokens), attended non-causally. Filler requests (tokens in no
    group of this level) read the scratch page; their tokens are False in `member`, not merged."""

    qo_indptr: torch.Tensor  # [R + 1] int32 host
    kv_indptr: torch.Tensor  # [R + 1] int32 host
    kv_indices: torch.Tensor  # int32 host
    kv_last_page_len: torch.Tensor  # [R] int32 host
    member: torch.Tensor  # [T] bool on the device: the token is in a group of this level
    groups: np.ndarray  # int64: the requests that are groups (the others are fillers)

    @property
    def num_requests(self) -> int:
        return self.qo_indptr.shape[0] - 1


@dataclass
class LevelWork:
    """The levels as work items of the GPU's shared-level kernel (forkserve/kernels/shared_level.py):
    item i is tokens work[i, 0] .. work[i, 0] + work[i, 1] (at most LEVEL_TILE_TOKENS, all in one
    group) over pages[work[i, 2] : work[i, 2] + work[i, 3]], its partial result written to slot
    work[i, 4]. Token t has counts[t] partials, in slots 0 .. counts[t] - 1. No fillers."""

    work: np.ndarray  # [W, 5] int32
    pages: np.ndarray  # int32
    counts: np.ndarray  # [T] int32


@dataclass
class CascadePlan:
    """A step's shared levels, and each sequence's own pages: those after its last shared level."""

    levels: list[CascadeLevel]
    work: LevelWork  # the same levels as the GPU's shared-level kernel takes them
    own_indptr: torch.Tensor  # [B + 1] int32 host
    own_indices: torch.Tensor  # int32 host
    pages_read: int  # pages one layer reads with these levels (each group's once; fillers not counted)
    pages_listed: int  # pages one layer reads with plain attention (each sequence all of its own)


def plan_cascade(sharing: Sharing, kv_indptr: np.ndarray, kv_indices: np.ndarray, query_start: np.ndarray,
                 page_size: int, scratch_page: int, device: torch.device) -> CascadePlan:
    """The step's levels from its sharing; row b's page table is kv_indices[kv_indptr[b]:kv_indptr[b+1]]."""
    levels = _build_levels(sharing, kv_indptr, kv_indices, query_start, page_size, scratch_page, device)
    return _with_own_pages(levels, level_work(levels, int(query_start[-1])), sharing, kv_indptr, kv_indices)


def _build_levels(sharing: Sharing, kv_indptr: np.ndarray, kv_indices: np.ndarray, query_start: np.ndarray,
                  page_size: int, scratch_page: int, device: torch.device) -> list[CascadeLevel]:
    """Each level's tiling of the batch; every level's member mask reaches the device in one copy."""
    query_lens = np.diff(query_start)
    host_levels, members, groups = [], [], []
    for group_of_seq, level_groups in zip(sharing.group_of_row, sharing.groups):
        group_pages = []
        for start_page, end_page, first_row in level_groups.tolist():
            first = kv_indptr[first_row]
            group_pages.append(kv_indices[first + start_page:first + end_page])
        run_starts = np.flatnonzero(np.diff(group_of_seq, prepend=-2) != 0)  # first sequence of each request
        run_group = group_of_seq[run_starts]
        pages = [group_pages[g] if g >= 0 else np.array([scratch_page], dtype=np.int32) for g in run_group]
        kv_ptr = np.zeros(len(run_starts) + 1, dtype=np.int32)
        np.cumsum([len(p) for p in pages], out=kv_ptr[1:])
        host_levels.append((np.append(query_start[run_starts], query_start[-1]).astype(np.int32), kv_ptr,
                            np.concatenate(pages).astype(np.int32),
                            np.where(run_group >= 0, page_size, 1).astype(np.int32)))
        members.append(np.repeat(group_of_seq, query_lens) >= 0)
        groups.append(np.flatnonzero(run_group >= 0))
    on_device = to_device(np.stack(members), device)
    return [CascadeLevel(*(torch.from_numpy(a) for a in arrays), member=on_device[d], groups=groups[d])
            for d, arrays in enumerate(host_levels)]


def level_work(levels: list[CascadeLevel], num_tokens: int) -> LevelWork:
    """The levels' groups cut into work items of at most LEVEL_TILE_TOKENS tokens; each token's
    partials fill slots 0, 1, .. in level order (a deeper group's tokens all lie in one group
    of each level above it, so one slot serves a whole item)."""
    items, pages = [], []
    filled = np.zeros(num_tokens, dtype=np.int32)
    num_pages = 0
    for level in levels:
        qo, kv_ptr, level_pages = level.qo_indptr.numpy(), level.kv_indptr.numpy(), level.kv_indices.numpy()
        for r in level.groups:
            first, end = int(qo[r]), int(qo[r + 1])
            slot = int(filled[first])
            assert (filled[first:end] == slot).all(), "a shared level's group straddles groups of the level above"
            filled[first:end] += 1
            group_pages = level_pages[kv_ptr[r]:kv_ptr[r + 1]]
            for start in range(first, end, LEVEL_TILE_TOKENS):
                items.append((start, min(LEVEL_TILE_TOKENS, end - start), num_pages, len(group_pages), slot))
            pages.append(group_pages)
            num_pages += len(group_pages)
    work = np.array(items, dtype=np.int32).reshape(-1, 5)
    return LevelWork(work, np.concatenate(pages).astype(np.int32) if pages else np.zeros(0, np.int32), filled)


def _with_own_pages(levels: list[CascadeLevel], work: LevelWork, sharing: Sharing, kv_indptr: np.ndarray,
                    kv_indices: np.ndarray) -> CascadePlan:
    """The plan: the levels, and each sequence's pages from its cut on."""
    cuts = sharing.cuts
    num_pages = np.diff(kv_indptr)
    position = np.arange(len(kv_indices)) - np.repeat(kv_indptr[:-1], num_pages)
    own = kv_indices[position >= np.repeat(cuts, num_pages)]
    own_indptr = np.zeros(len(cuts) + 1, dtype=np.int32)
    np.cumsum(num_pages - cuts, out=own_indptr[1:])
    pages_read = sharing.shared_pages + len(own)
    return CascadePlan(levels, work, torch.from_numpy(own_indptr), torch.from_numpy(np.ascontiguousarray(own)),
                       pages_read, len(kv_indices))


class CascadePlanner:
    """Each step's cascade plan, reusing the levels while the step's sharing and query lengths
    stay the same (every decode step between a sequence joining or leaving): the shared pages'
    tables and member masks are then unchanged, and only each row's own pages are rebuilt. The
    core gives a sharing a new key whenever it changes (engine/sharing.BatchSharing)."""

    def __init__(self) -> None:
        self._sharing_key = -1
        self._query_lens: np.ndarray | None = None
        self._levels: list[CascadeLevel] = []
        self._work: LevelWork | None = None

    def plan(self, sharing_key: int, sharing: Sharing, kv_indptr: np.ndarray, kv_indices: np.ndarray,
             query_start: np.ndarray, page_size: int, scratch_page: int, device: torch.device) -> CascadePlan:
        """`plan_cascade` for a sharing known by its key."""
        query_lens = np.diff(query_start)
        if sharing_key != self._sharing_key or self._query_lens is None or \
                not np.array_equal(query_lens, self._query_lens):
            self._sharing_key, self._query_lens = sharing_key, query_lens
            self._levels = _build_levels(sharing, kv_indptr, kv_indices, query_start, page_size, scratch_page,
                                         device)
            self._work = level_work(self._levels, int(query_start[-1]))
        return _with_own_pages(self._levels, self._work, sharing, kv_indptr, kv_indices)


def merge_partials(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor,
                   part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two disjoint sets of keys, from each set's output and log-sum-exp (natural log).

    out/part: [N, H, D], lse/part_lse: [N, H]. Exact: softmax over the union re-weights each
    part by its share of the total exp-sum.
    """
    top = torch.maximum(lse, part_lse)
    w, w_part = torch.exp(lse - top), torch.exp(part_lse - top)
    total = w + w_part
    merged = (out * w.unsqueeze(-1) + part * w_part.unsqueeze(-1)) / total.unsqueeze(-1)
    return merged, top + torch.log(total)
