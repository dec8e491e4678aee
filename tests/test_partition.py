"""The data-parallel partitioner and work queues (no Ray): each shared prefix on one replica unless
its group is too large, a skewed batch's big group split with the imbalance bound held, every
request exactly once, stealing by whole units, and the simulation's bars at a small scale."""
from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.partition_sim import compare
from forkserve.scaleout.partition import partition, prefix_layout
from forkserve.scaleout.work_queues import Unit, WorkQueues

PAGE = 4


def grouped_batch(sizes: list[int], prefix_len: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts `group prefix + own suffix` (suffixes start with distinct tokens), shuffled; and each one's group."""
    rng = random.Random(seed)
    prompts, group_of = [], []
    for g, size in enumerate(sizes):
        prefix = [1000 + g] + [rng.randrange(1, 500) for _ in range(prefix_len - 1)]
        for m in range(size):
            prompts.append(prefix + [10_000 + m] + [rng.randrange(1, 500) for _ in range(rng.randrange(2, 12))])
            group_of.append(g)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [group_of[i] for i in order]


def replicas_of(planned, group_of: list[int]) -> dict[int, set[int]]:
    where: dict[int, set[int]] = {}
    for r, units in enumerate(planned.units):
        for unit in units:
            for i in unit:
                where.setdefault(group_of[i], set()).add(r)
    return where


def all_requests(planned) -> list[int]:
    return sorted(i for units in planned.units for unit in units for i in unit)


def test_layout_shares_whole_pages_from_the_minimum_up() -> None:
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 3]]
    layout = prefix_layout(prompts, PAGE, min_shared_len=4)
    assert [prompts[i] for i in layout.order] == sorted(prompts)
    # neighbours share 7 and 9 tokens: 4 and 8 as whole pages; the last shares nothing
    assert layout.shared.tolist() == [0, 8, 4, 0]
    assert prefix_layout(prompts, PAGE, min_shared_len=8).shared.tolist() == [0, 8, 0, 0]
    # identical prompts: the later one keeps its last token to compute
    assert prefix_layout([[5] * 8, [5] * 8], PAGE, 4).shared.tolist() == [0, 4]


def test_groups_that_fit_stay_whole() -> None:
    """Groups under the cut's tolerance window (a few % of a share): every cut falls between groups."""
    rng = random.Random(5)
    prompts, group_of = grouped_batch([rng.randrange(2, 6) for _ in range(60)], prefix_len=40)
    planned = partition(prefix_layout(prompts, PAGE, 8), np.full(len(prompts), 8), num_replicas=3)
    assert all_requests(planned) == list(range(len(prompts)))
    assert all(len(replicas) == 1 for replicas in replicas_of(planned, group_of).values())
    assert planned.duplicated_tokens == 0
    assert planned.imbalance <= 1.1


@pytest.mark.parametrize("num_replicas", [2, 3, 4])
def test_skewed_batch_splits_the_big_group_and_holds_the_bound(num_replicas: int) -> None:
    """One group holds half the batch: it is split over the replicas it needs, its prefix computed
    once on each; the small groups are not split; imbalance stays within 1.1."""
    sizes = [80] + [2] * 40
    prompts, group_of = grouped_batch(sizes, prefix_len=48, seed=num_replicas)
    layout = prefix_layout(prompts, PAGE, 8)
    planned = partition(layout, np.full(len(prompts), 32), num_replicas)
    assert all_requests(planned) == list(range(len(prompts)))
    where = replicas_of(planned, group_of)
    assert planned.imbalance <= 1.1, planned.loads
    if num_replicas > 2:
        assert len(where[0]) >= 2  # the big group is over one replica's share: split
    assert all(len(where[g]) == 1 for g in range(1, len(sizes)))
    split_pieces = sum(len(r) - 1 for r in where.values())
    assert planned.duplicated_tokens == 48 * split_pieces
    assert planned.duplicated_tokens <= 0.05 * planned.unique_tokens


def test_more_replicas_than_requests() -> None:
    prompts, _ = grouped_batch([2, 1], prefix_len=8)
    planned = partition(prefix_layout(prompts, PAGE, 8), np.full(3, 4), num_replicas=5)
    assert all_requests(planned) == [0, 1, 2]
    assert len(planned.units) == 5


def test_stealing_takes_whole_units_from_the_most_loaded_back() -> None:
    queues = WorkQueues([[Unit([0], 1.0)], [Unit([1], 5.0), Unit([2], 5.0), Unit([3], 5.0), Unit([4], 5.0)],
                         [Unit([5], 2.0), Unit([6], 2.0)]], wave_cost=1.0)
    assert [u.items for u in queues.next_wave(0)] == [[0]]
    # replica 0 is dry: it takes the back half of replica 1's queue (the most loaded), in order
    assert [u.items for u in queues.next_wave(0)] == [[3]]
    assert [u.items for u in queues.queues[0]] == [[4]]
    assert [u.items for u in queues.queues[1]] == [[1], [2]]
    assert queues.stolen == 2


def test_a_lost_replica_work_goes_to_the_least_loaded() -> None:
    queues = WorkQueues([[Unit([0], 1.0), Unit([1], 1.0)], [Unit([2], 9.0)], [Unit([3], 4.0)]], wave_cost=1.0)
    wave = queues.next_wave(0)
    queues.lose(0, wave)
    assert queues.live == {1, 2}
    assert [u.items for u in queues.queues[2]] == [[0], [1], [3]]  # unfinished first, then its queue
    assert queues.next_wave(0) == [] or 0 not in queues.live


def test_simulation_meets_the_bars_at_small_scale() -> None:
    rows, unique = compare(num_requests=20_000, num_prefixes=400, num_replicas=16, block_size=128, seed=1)
    (_, seconds, imbalance, duplicated), *baselines = rows
    assert imbalance <= 1.1 and duplicated <= 0.02 * unique and seconds < 5
    assert all(d > 10 * max(duplicated, 1) for _, _, _, d in baselines)  # the prefix-blind ones repeat prefixes
