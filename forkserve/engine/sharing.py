"""Which of a step's sequences share which KV, read from their tree paths (the core's half of
shared-prefix attention; the worker builds the attention levels from it: worker/attention/cascade.py).

A tree node on the paths of c of the step's sequences is shared c ways. A *segment* is a run of
consecutive nodes on a path shared by the same sequences. A segment worth a pass of its own
(`CascadeRule`) becomes a group at its *depth* (how many such segments lie above it); all groups
of one depth form a *level*. A segment that fails the rule folds into the next kept one below it
on every path through it, so each sequence's pages are still read exactly once. Sequences that
share are adjacent when the batch is sorted by tree path (`path_order`), which keeps a group to
one attention request; any order is still correct.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from forkserve.engine.tree import TreeNode
from forkserve.worker.plan import Sharing


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


def path_order(paths: Sequence[list[TreeNode]]) -> list[int]:
    """Indices that sort sequences by tree path, so that all sequences under a node are adjacent."""
    keys = [tuple(map(id, path)) for path in paths]
    return sorted(range(len(paths)), key=keys.__getitem__)


def find_sharing(paths: Sequence[list[TreeNode]], page_size: int, rule: CascadeRule) -> Sharing | None:
    """The groups of each depth the rule keeps, or None when no sharing is worth a pass.

    paths[b] is sequence b's path in the tree (`TreeNode.path()`): computed, page-aligned KV
    that its page table starts with.
    """
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
    group_index: list[dict[TreeNode, int]] = [{} for _ in kept_depths]
    groups: list[list[tuple[int, int, int]]] = [[] for _ in kept_depths]
    group_of_row = np.full((len(kept_depths), len(paths)), -1, dtype=np.int64)
    cuts = np.zeros(len(paths), dtype=np.int64)
    for b, row in enumerate(candidates):
        start = 0
        for level, depth in enumerate(kept_depths):
            if depth >= len(row):
                break
            node, end, _ = row[depth]
            g = group_index[level].get(node)
            if g is None:
                g = group_index[level][node] = len(groups[level])
                groups[level].append((start, end, b))
            group_of_row[level, b] = g
            start = end
        cuts[b] = start
    return Sharing(group_of_row, [np.array(level, dtype=np.int64).reshape(-1, 3) for level in groups], cuts)


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


class BatchSharing:
    """Each step's batch order and sharing, kept while the batch's tree nodes stay the same.

    Through decode a batch keeps its sequences and they keep their tree nodes (only their own
    pages grow) for many steps, and walking a thousand tree paths a step costs milliseconds of
    host time. So the path order and the sharing are kept while the nodes, in order, stay the
    same, and the sharing keeps its key, by which the worker reuses the levels it built from it
    (worker/attention/cascade.CascadePlanner). Node identity is a sufficient key: a node's pages never
    change, and a split of a node on a row's path inserts its head above it for every row that
    passes through, so the sharing among the rows is the same.
    """

    def __init__(self, rule: CascadeRule, page_size: int) -> None:
        self.rule = rule
        self.page_size = page_size
        self._order_nodes: list[TreeNode] = []
        self._order: list[int] = []
        self._nodes: list[TreeNode] = []
        self._sharing: Sharing | None = None
        self._keys = itertools.count()
        self._key = -1

    def order(self, nodes: list[TreeNode]) -> list[int]:
        """Rows of a scheduled batch (given by each row's tree node) in path order (`path_order`)."""
        if nodes != self._order_nodes:
            self._order_nodes, self._order = nodes, path_order([node.path() for node in nodes])
        return self._order

    def sharing(self, nodes: list[TreeNode]) -> tuple[int, Sharing | None]:
        """`find_sharing` for rows whose tree nodes are `nodes`, and its key (new when it changed)."""
        if nodes != self._nodes:
            self._nodes, self._key = nodes, next(self._keys)
            self._sharing = find_sharing([node.path() for node in nodes], self.page_size, self.rule)
        return self._key, self._sharing
