"""Where each prefix-tree node's pages are, and the transfers that move them.

The prefix index (engine/tree.py: tokens -> node, refs, pins) says *what* is cached; a node's
`Location` says *where*: GPU page ids, or slots of the host tier's pool (a node evicted from the
GPU pool when a host tier is configured). Disk is content-addressed (page keys, worker/disk_store.py)
and needs no record here. Every move between places is a `KVTransfer` queued in `Transfers`;
the next step plan carries them, and the worker runs them in order before that step writes any
KV (worker/transfers.py), so the core never touches a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from forkserve.engine.page_keys import KEY_BYTES
from forkserve.worker.plan import KVTransfer, TransferKind


class Tier(IntEnum):
    GPU = 0
    HOST = 1


@dataclass(slots=True)
class Location:
    """A node's pages: ids in the GPU page pool or in the host slot pool, one per page, in order."""

    tier: Tier
    ids: list[int]

    def split(self, k: int) -> Location:
        """Cut after the first k pages: the head is returned, self keeps the rest."""
        head = Location(self.tier, self.ids[:k])
        self.ids = self.ids[k:]
        return head


class Transfers:
    """Transfers the core asks for, held until the next step's plan carries them.

    Consecutive transfers of one kind merge into one operation unless one would read or rewrite
    a page or slot the operation already writes (then order matters, and a new one starts).
    """

    def __init__(self) -> None:
        self._ops: list[tuple[TransferKind, list[int], list[int], list[bytes]]] = []
        self._written: set[int] = set()  # destinations of the last operation

    def add(self, kind: TransferKind, src: list[int], dst: list[int], keys: list[bytes] = ()) -> None:
        if not src:
            return
        last = self._ops[-1] if self._ops else None
        if last is None or last[0] != kind or any(p in self._written for p in src) \
                or any(p in self._written for p in dst):
            last = (kind, [], [], [])
            self._ops.append(last)
            self._written = set()
        last[1].extend(src)
        last[2].extend(dst)
        last[3].extend(keys)
        self._written.update(dst)

    def copy(self, src: list[int], dst: list[int]) -> None:
        """GPU page copies (forks' partly filled last pages): the tree's copy_pages callback."""
        self.add(TransferKind.COPY, src, dst)

    def take(self) -> list[KVTransfer]:
        """The transfers queued so far, in order, as plan data; the queue is emptied."""
        ops, self._ops, self._written = self._ops, [], set()
        return [KVTransfer(kind, np.asarray(src, dtype=np.int32), np.asarray(dst, dtype=np.int32),
                           np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES) if keys else None)
                for kind, src, dst, keys in ops]

    def __bool__(self) -> bool:
        return bool(self._ops)
