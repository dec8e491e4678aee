"""KV transfers: what the core queues (engine/locations.Transfers) is what the worker runs
(worker/transfers.KVTransfers), in order, with the same result as moving page by page."""
from __future__ import annotations

import numpy as np
import torch

from forkserve.engine.locations import Transfers
from forkserve.worker.kv_cache import KVCache
from forkserve.worker.plan import TransferKind
from forkserve.worker.transfers import KVTransfers, runs


def numbered_cache(num_pages: int) -> KVCache:
    cache = KVCache(num_pages, 2, 3, 1, 2, torch.float32, torch.device("cpu"))
    for page in range(num_pages):
        cache.k[:, page], cache.v[:, page] = page, -page
    return cache


def test_offload_copy_load_run_in_order() -> None:
    cache = numbered_cache(6)
    worker = KVTransfers(cache, num_host_slots=4)
    queue = Transfers()
    queue.add(TransferKind.OFFLOAD, [1, 2], [3, 0])
    queue.copy([0], [1])  # page 1 rewritten after it went to the host
    queue.add(TransferKind.LOAD, [3, 0], [4, 5])
    queue.add(TransferKind.LOAD, [3], [2])
    ops = queue.take()
    assert [op.kind for op in ops] == [TransferKind.OFFLOAD, TransferKind.COPY, TransferKind.LOAD]
    assert not queue and queue.take() == []
    worker.run(ops)
    assert cache.k[0, :6, 0, 0, 0].tolist() == [0, 0, 1, 3, 1, 2]
    assert cache.v[2, :6, 1, 0, 1].tolist() == [0, 0, -1, -3, -1, -2]
    assert worker.pages_moved["offload"] == 2 and worker.pages_moved["load"] == 3


def test_a_transfer_that_reads_what_the_last_one_wrote_starts_a_new_one() -> None:
    queue = Transfers()
    queue.add(TransferKind.OFFLOAD, [1], [0])
    queue.add(TransferKind.OFFLOAD, [2], [0])  # slot 0 rewritten: order matters
    queue.copy([5], [6])
    queue.copy([6], [7])  # reads what the copy before wrote
    ops = queue.take()
    assert [(op.kind, op.src.tolist(), op.dst.tolist()) for op in ops] == [
        (TransferKind.OFFLOAD, [1], [0]), (TransferKind.OFFLOAD, [2], [0]),
        (TransferKind.COPY, [5], [6]), (TransferKind.COPY, [6], [7])]


def test_runs_of_consecutive_ids() -> None:
    assert runs(np.array([3, 4, 5, 9, 1, 2])) == [(0, 3, 3), (3, 9, 1), (4, 1, 2)]
    assert runs(np.array([], dtype=np.int32)) == []
