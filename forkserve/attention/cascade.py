"""Shared-prefix (cascade) attention plans: read each shared prefix once per step for all its queries.

For one step, the prefix tree says which of the step's sequences share which KV: a tree node on
the paths of c of them is shared c ways. A *segment* is a run of consecutive nodes on a path
shared by the same sequences. A segment worth a pass of its own (`CascadeRule`) becomes a group
at its *depth* (how many such segments lie above it): all queries of all sequences under it
attend to its pages in one batched, non-causal pass (Hydragen; the shared KV precedes every
query). All groups of one depth form one kernel call, a *level*. What is left of each sequence
(its own tail, plus any shared run too small to pay for a pass) is the last level, attended
causally as plain attention would. Every level returns partial outputs with their log-sum-exp,
and `merge_partials` combines them exactly.

Depths nest like the tree: system prompt -> document -> question -> samples. A segment that
fails the rule folds into the next kept one below it on every path through it, so each
sequence's pages are still read exactly once.

A level is laid out for FlashInfer's ragged kernels (prefill steps on the GPU) and the reference
backend as a tiling of the step's whole flat batch into ragged requests: each run of consecutive
tokens of one group is a request over the group's pages, and each run of tokens in no group of
that level is a *filler* request over the scratch page, left out of the merge (`member`). Decode
steps on the GPU take the same levels as `LevelWork`: the groups' runs cut into work items of at
most LEVEL_TILE_TOKENS tokens, all levels in one list, no fillers.
Sequences that share are adjacent when the batch is sorted by tree path (`path_order`), which
keeps a group to one request; any order is still correct.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from forkserve.engine.tree import TreeNode
from forkserve.transfer import to_device


@dataclass(frozen=True)
class CascadeRule:
    """When sharing is worth a pass of its own (in tokens of KV not re-read, per layer and step).

    A pass costs a kernel launch and a merge over the batch, so a short prefix shared by two
    sequences is left to plain attention. A level (one kernel call per layer) must save enough
    in all to pay for its launches; at most max_levels depths are kept (the CUDA graphs are
    captured for up to that many), the ones that save most.
    """

    min_segment_tokens_saved: int = 1024  # (sharers - 1) x segment tokens
    min_level_tokens_saved: int = 16384  # summed over the level's groups
    max_levels: int = 2


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


LEVEL_TILE_TOKENS = 32  # query tokens per work item of the GPU's shared-level kernel


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


@dataclass
class _Group:
    """A segment kept as a pass: its page range on every member's table, and the members' rows."""

    start_page: int
    end_page: int
    seqs: list[int]


@dataclass
class Sharing:
    """Which of a batch's rows share which pages, as plans use it: per kept depth its groups, and
    per row the page its own part starts at. It depends only on the rows' tree paths."""

    levels: list[list[_Group]]
    cuts: np.ndarray  # [B] int64


def path_order(paths: Sequence[list[TreeNode]]) -> list[int]:
    """Indices that sort sequences by tree path, so that all sequences under a node are adjacent."""
    keys = [tuple(map(id, path)) for path in paths]
    return sorted(range(len(paths)), key=keys.__getitem__)


def plan_cascade(paths: Sequence[list[TreeNode]], kv_indptr: np.ndarray, kv_indices: np.ndarray,
                 query_start: np.ndarray, page_size: int, scratch_page: int, device: torch.device,
                 rule: CascadeRule) -> CascadePlan | None:
    """The step's levels, or None when no sharing is worth a pass (then plain attention runs).

    paths[b] is sequence b's path in the tree (`TreeNode.path()`): computed, page-aligned KV that
    its page table kv_indices[kv_indptr[b]:kv_indptr[b+1]] starts with.
    """
    sharing = find_sharing(paths, page_size, rule)
    if sharing is None:
        return None
    levels = _build_levels(sharing, kv_indptr, kv_indices, query_start, page_size, scratch_page, device)
    return _with_own_pages(levels, level_work(levels, int(query_start[-1])), sharing, kv_indptr, kv_indices)


def find_sharing(paths: Sequence[list[TreeNode]], page_size: int, rule: CascadeRule) -> Sharing | None:
    """The groups of each depth the rule keeps, or None when no sharing is worth a pass."""
    sharers: dict[TreeNode, int] = {}
    for path in paths:
        for node in path:
            sharers[node] = sharers.get(node, 0) + 1
    # Candidate segments per sequence, top down: (end node, end page, sharers). Counts only fall
    # along a path, so the first node shared by fewer than two ends the candidates.
    candidates: list[list[tuple[TreeNode, int, int]]] = []
    for path in paths:
        row: list[tuple[TreeNode, int, int]] = []
        start, i = 0, 0
        while i < len(path) and sharers[path[i]] >= 2:
            count = sharers[path[i]]
            while i + 1 < len(path) and sharers[path[i + 1]] == count:
                i += 1
            end = path[i].end // page_size
            if (count - 1) * (end - start) * page_size >= rule.min_segment_tokens_saved:
                row.append((path[i], end, count))
                start = end
            i += 1
        candidates.append(row)
    kept_depths = _depths_worth_a_level(candidates, page_size, rule)
    if not kept_depths:
        return None
    levels: list[dict[TreeNode, _Group]] = [{} for _ in kept_depths]
    cuts = np.zeros(len(paths), dtype=np.int64)
    for b, row in enumerate(candidates):
        start = 0
        for level, depth in enumerate(kept_depths):
            if depth >= len(row):
                break
            node, end, _ = row[depth]
            group = levels[level].get(node)
            if group is None:
                group = levels[level][node] = _Group(start, end, [])
            group.seqs.append(b)
            start = end
        cuts[b] = start
    return Sharing([list(groups.values()) for groups in levels], cuts)


def _depths_worth_a_level(candidates: list[list[tuple[TreeNode, int, int]]], page_size: int,
                          rule: CascadeRule) -> list[int]:
    """Depths whose groups together save enough (the max_levels that save most); the others
    fold into the depths below them."""
    saved: dict[int, int] = {}
    seen: set[TreeNode] = set()
    for row in candidates:
        start = 0
        for depth, (node, end, count) in enumerate(row):
            if node not in seen:
                seen.add(node)
                saved[depth] = saved.get(depth, 0) + (count - 1) * (end - start) * page_size
            start = end
    worth = [d for d, tokens in saved.items() if tokens >= rule.min_level_tokens_saved]
    return sorted(sorted(worth, key=lambda d: -saved[d])[:rule.max_levels])


def _build_levels(sharing: Sharing, kv_indptr: np.ndarray, kv_indices: np.ndarray, query_start: np.ndarray,
                  page_size: int, scratch_page: int, device: torch.device) -> list[CascadeLevel]:
    """Each level's tiling of the batch; every level's member mask reaches the device in one copy."""
    num_seqs = len(sharing.cuts)
    query_lens = np.diff(query_start)
    host_levels, members, groups = [], [], []
    for level_groups in sharing.levels:
        group_of_seq = np.full(num_seqs, -1, dtype=np.int64)
        group_pages = []
        for g, group in enumerate(level_groups):
            group_of_seq[group.seqs] = g
            first = kv_indptr[group.seqs[0]]
            group_pages.append(kv_indices[first + group.start_page:first + group.end_page])
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
    pages_read = sum(group.end_page - group.start_page for groups in sharing.levels for group in groups) + len(own)
    return CascadePlan(levels, work, torch.from_numpy(own_indptr), torch.from_numpy(np.ascontiguousarray(own)),
                       pages_read, len(kv_indices))


class CascadePlanner:
    """Each step's batch order and cascade plan, reusing what the batch's tree nodes determine.

    Through decode a batch keeps its sequences and they keep their tree nodes (only their own
    pages grow) for many steps, and walking a thousand tree paths a step costs milliseconds of
    host time. So the path order, the sharing, and the levels (the shared pages' tables and
    member masks) are kept while the nodes, in order, and the query lengths stay the same; only
    each row's own pages are rebuilt. Node identity is a sufficient key: a node's pages never
    change, and a split of a node on a row's path inserts its head above it for every row that
    passes through, so the sharing among the rows is the same.
    """

    def __init__(self, rule: CascadeRule) -> None:
        self.rule = rule
        self._order_nodes: list[TreeNode] = []
        self._order: list[int] = []
        self._plan_nodes: list[TreeNode] = []
        self._sharing: Sharing | None = None
        self._query_lens: np.ndarray | None = None
        self._levels: list[CascadeLevel] = []
        self._work: LevelWork | None = None

    def order(self, nodes: list[TreeNode]) -> list[int]:
        """Rows of a scheduled batch (given by each row's tree node) in path order (`path_order`)."""
        if nodes != self._order_nodes:
            self._order_nodes, self._order = nodes, path_order([node.path() for node in nodes])
        return self._order

    def plan(self, nodes: list[TreeNode], kv_indptr: np.ndarray, kv_indices: np.ndarray, query_start: np.ndarray,
             page_size: int, scratch_page: int, device: torch.device) -> CascadePlan | None:
        """`plan_cascade` for rows whose tree nodes are `nodes`."""
        if nodes != self._plan_nodes:
            self._plan_nodes, self._query_lens = nodes, None
            self._sharing = find_sharing([node.path() for node in nodes], page_size, self.rule)
        if self._sharing is None:
            return None
        query_lens = np.diff(query_start)
        if self._query_lens is None or not np.array_equal(query_lens, self._query_lens):
            self._query_lens = query_lens
            self._levels = _build_levels(self._sharing, kv_indptr, kv_indices, query_start, page_size, scratch_page,
                                         device)
            self._work = level_work(self._levels, int(query_start[-1]))
        return _with_own_pages(self._levels, self._work, self._sharing, kv_indptr, kv_indices)


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
