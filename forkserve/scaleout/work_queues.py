"""The driver's queues of not-yet-started units, one per replica, with work stealing by whole units.

A replica is handed its next wave from the front of its own queue; a replica whose queue is
empty takes units from the back of the most loaded queue (by estimated cost), about half of it,
so nobody waits on a straggler. Units are whole groups of the partition (partition.py), so a
stolen unit computes no prefix twice. A lost replica's queue, and whatever it had not finished,
goes to the least loaded live replica.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass
class Unit(Generic[Item]):
    """Work that runs together on one replica: its items (request indices or batch lines) and estimated cost."""

    items: list[Item]
    cost: float


class WorkQueues(Generic[Item]):
    """Per-replica deques of units; `wave_cost` is how much a replica takes from its own queue at a time."""

    def __init__(self, units: list[list[Unit[Item]]], wave_cost: float) -> None:
        self.queues: list[deque[Unit[Item]]] = [deque(u for u in replica if u.items) for replica in units]
        self.wave_cost = wave_cost
        self.live = set(range(len(units)))
        self.stolen = 0  # units taken from another replica's queue

    def queued_cost(self, replica: int) -> float:
        return sum(unit.cost for unit in self.queues[replica])

    def next_wave(self, replica: int) -> list[Unit[Item]]:
        """Units for `replica` to run next: its own, else stolen from the most loaded live queue; [] when no work is left."""
        own = self.queues[replica]
        if not own:
            donors = [r for r in self.live if r != replica and self.queues[r]]
            if not donors:
                return []
            donor = max(donors, key=self.queued_cost)
            target = self.queued_cost(donor) / 2
            taken: list[Unit[Item]] = []
            while self.queues[donor] and (not taken or sum(u.cost for u in taken) < target):
                taken.append(self.queues[donor].pop())
            self.stolen += len(taken)
            own.extend(reversed(taken))  # keep the donor's (DFS) order
        wave = [own.popleft()]
        while own and sum(u.cost for u in wave) < self.wave_cost:
            wave.append(own.popleft())
        return wave

    def lose(self, replica: int, unfinished: list[Unit[Item]]) -> None:
        """`replica` is gone: its unfinished units, then its queue, go to the least loaded live replica."""
        self.live.discard(replica)
        orphans = [*unfinished, *self.queues[replica]]
        self.queues[replica].clear()
        if orphans and self.live:
            heir = min(self.live, key=self.queued_cost)
            self.queues[heir].extendleft(reversed(orphans))

    @property
    def empty(self) -> bool:
        return not any(self.queues[r] for r in self.live)
