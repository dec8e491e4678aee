"""Cut one batch across data-parallel replicas so that each shared prefix is computed once in the cluster.

The batch's prompts are laid out in depth-first order of their prefix trie (sorted by tokens, as
the single-engine planner does); a shared prefix is then a contiguous run of that order, and the
cost of cutting the order between two neighbours is exactly their shared prefix (the replica on
the right computes it again). So the partition is N contiguous segments of that order, one per
replica, each close to an equal share of the estimated cost (prefill of the trie's unique tokens
plus decode tokens). Each cut is placed inside a tolerance window around its ideal position, at
the neighbour pair sharing the fewest tokens: between two groups whenever the window holds such
a pair, so a group is split (and its prefix computed on each replica it lands on) only when it
is larger than the window allows. Within a segment the work is cut into *units* of whole groups
(runs between neighbours sharing nothing), the granularity of work stealing: moving a unit to
another replica never computes a prefix twice.

Everything past building the layout is numpy over the N requests (the simulation in
benchmarks/partition_sim.py partitions a million requests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from forkserve.engine.tree import common_prefix_len

# Each cut lands within this fraction of a replica's share of its ideal position.
DEFAULT_TOLERANCE = 0.04
# A replica's segment is cut into about this many units (whole groups, merged up to that size).
DEFAULT_UNITS_PER_REPLICA = 8


@dataclass
class PrefixLayout:
    """A batch in depth-first order of its prefix trie.

    `order[k]` is the request at position k; `shared[k]` the tokens position k shares with
    position k - 1 (page-aligned, 0 when under the planner's minimum shared length, and 0 at
    k = 0); `lengths[k]` its prompt length. `lengths - shared` are the trie's unique tokens.
    """

    order: np.ndarray
    shared: np.ndarray
    lengths: np.ndarray

    @property
    def unique_tokens(self) -> np.ndarray:
        return self.lengths - self.shared


def prefix_layout(prompts: Sequence[Sequence[int]], page_size: int, min_shared_len: int) -> PrefixLayout:
    """Sort the prompts (the trie's DFS order) and measure each neighbour's shared prefix as the
    prefix tree can share it: whole pages, and only from `min_shared_len` tokens up."""
    token_lists = [list(p) for p in prompts]
    order = sorted(range(len(token_lists)), key=token_lists.__getitem__)
    shared = np.zeros(len(order), dtype=np.int64)
    for k in range(1, len(order)):
        common = common_prefix_len(token_lists[order[k - 1]], token_lists[order[k]], page_size)
        # the later prompt must keep at least one token to compute
        common = min(common, len(token_lists[order[k]]) - 1) // page_size * page_size
        shared[k] = common if common >= min_shared_len else 0
    lengths = np.array([len(token_lists[i]) for i in order], dtype=np.int64)
    return PrefixLayout(np.array(order, dtype=np.int64), shared, lengths)


@dataclass
class Partition:
    """Units per replica, in run order; each unit is a list of request indices (DFS order).

    `loads` is each replica's estimated cost (its duplicated prefix included);
    `duplicated_tokens` the prefix tokens computed on more than one replica;
    `unique_tokens` the trie's tokens (what one engine would compute).
    """

    units: list[list[list[int]]]
    unit_costs: list[list[float]]
    loads: np.ndarray
    duplicated_tokens: int
    unique_tokens: int

    @property
    def imbalance(self) -> float:
        """max / mean of the replicas' estimated cost (1.0 is perfect)."""
        mean = float(self.loads.mean()) if len(self.loads) else 0.0
        return float(self.loads.max()) / mean if mean > 0 else 1.0


def partition(layout: PrefixLayout, decode_tokens: np.ndarray, num_replicas: int,
              decode_weight: float = 1.0, tolerance: float = DEFAULT_TOLERANCE,
              units_per_replica: int = DEFAULT_UNITS_PER_REPLICA, keep_requests: bool = True) -> Partition:
    """Cut `layout` into `num_replicas` cost-balanced segments, each cut into units of whole groups.

    `decode_tokens[i]` is request i's estimated decode tokens (max_tokens x samples), weighted
    by `decode_weight` against one prefill token. `keep_requests=False` leaves the units' request
    lists empty (the simulation needs only the costs).
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    n = len(layout.order)
    shared = layout.shared
    cost = layout.unique_tokens.astype(np.float64) + decode_weight * np.asarray(decode_tokens, np.float64)[layout.order]
    prefix = np.concatenate([[0.0], np.cumsum(cost)])
    share = prefix[-1] / num_replicas
    group_starts = np.flatnonzero(shared == 0)
    cuts = [0]
    for k in range(1, num_replicas):
        cuts.append(_best_cut(prefix, shared, group_starts, k * share, tolerance * share, cuts[-1], n))
    cuts.append(n)

    units: list[list[list[int]]] = []
    unit_costs: list[list[float]] = []
    loads = np.zeros(num_replicas)
    duplicated = 0
    min_unit_cost = share / max(units_per_replica, 1)
    for r in range(num_replicas):
        start, stop = cuts[r], cuts[r + 1]
        repeated = int(shared[start]) if start < stop else 0  # the cut's shared prefix, computed again here
        duplicated += repeated
        loads[r] = prefix[stop] - prefix[start] + repeated
        bounds = _unit_bounds(prefix, shared, start, stop, min_unit_cost)
        unit_costs.append([float(prefix[b] - prefix[a]) + (repeated if a == start else 0)
                           for a, b in zip(bounds[:-1], bounds[1:])])
        units.append([layout.order[a:b].tolist() if keep_requests else [] for a, b in zip(bounds[:-1], bounds[1:])])
    return Partition(units, unit_costs, loads, duplicated, int(layout.unique_tokens.sum()))


def _best_cut(prefix: np.ndarray, shared: np.ndarray, group_starts: np.ndarray, ideal: float, slack: float,
              previous: int, n: int) -> int:
    """The cut position (a segment starts there) within `slack` of `ideal` cost that splits the
    fewest shared tokens, the closest to `ideal` among those; positions stay non-decreasing.

    When that splits a group (d tokens computed again), the nearest group boundary outside the
    window is taken instead if it is off `ideal` by no more than d: moving the cut shifts at
    most that much work between two replicas, while the split adds d of pure repetition."""
    lo = max(int(np.searchsorted(prefix, ideal - slack, side="left")), previous + 1)
    hi = min(int(np.searchsorted(prefix, ideal + slack, side="right")), n)
    if lo >= hi:  # one request is larger than the window: cut next to it
        return min(max(int(np.searchsorted(prefix, ideal)), previous + 1), n) if previous < n else n
    window = shared[lo:hi]
    candidates = lo + np.flatnonzero(window == window.min())
    best = int(candidates[np.argmin(np.abs(prefix[candidates] - ideal))])
    if shared[best] > 0:
        k = int(np.searchsorted(group_starts, best))
        near = [int(g) for g in group_starts[max(k - 1, 0):k + 1] if previous < g < n]
        if near:
            boundary = min(near, key=lambda g: abs(prefix[g] - ideal))
            if abs(prefix[boundary] - ideal) <= shared[best]:
                return boundary
    return best


def _unit_bounds(prefix: np.ndarray, shared: np.ndarray, start: int, stop: int, min_cost: float) -> list[int]:
    """Unit boundaries of a segment: group starts (neighbours sharing nothing), keeping the first
    group start past each multiple of `min_cost` so that tiny groups travel together."""
    if start >= stop:
        return [start]
    group_starts = start + 1 + np.flatnonzero(shared[start + 1:stop] == 0)
    if len(group_starts) and min_cost > 0:
        bucket = np.floor((prefix[group_starts] - prefix[start]) / min_cost)
        _, first = np.unique(bucket, return_index=True)
        group_starts = group_starts[first]
        group_starts = group_starts[bucket[first] > 0]
    return [start, *group_starts.tolist(), stop]
