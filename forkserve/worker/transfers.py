"""The worker's side of KV transfers: a plan's page copies and tier moves, run in order before its
step writes any KV (worker/plan.KVTransfer says what each moves).

The host tier's pool lives here: [slots, 2 (K, V), layers, page_size, kv_heads, head_dim], one
slot per page and contiguous per slot, in pinned memory on a GPU machine (plain memory on CPU,
where the reference backend's KV tensors stand in for the GPU pool). On CUDA the transfers run
on their own stream: it waits for what the compute stream queued before (a page being moved may
still be written by the step in flight), and the next forward waits for it through the stream's
event, so nothing is read before it has arrived and the host never blocks on a copy.
"""
from __future__ import annotations

import numpy as np
import torch

from forkserve.worker.disk_store import DiskStore
from forkserve.worker.kv_cache import KVCache
from forkserve.worker.plan import KVTransfer, TransferKind


def runs(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(position in ids, first id, length) of each run of consecutive ids."""
    if len(ids) == 0:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(ids)]])
    return [(int(s), int(ids[s]), int(e - s)) for s, e in zip(starts, ends)]


class KVTransfers:
    """Runs a plan's transfers against the KV tensors, the host pool and the disk store."""

    def __init__(self, kv_cache: KVCache, num_host_slots: int = 0, disk: DiskStore | None = None) -> None:
        self.kv = kv_cache
        self.device = kv_cache.k.device
        k = kv_cache.k
        self.page_shape = (2, k.shape[0]) + tuple(k.shape[2:])  # one page: K and V of every layer
        self.host = torch.zeros((num_host_slots,) + self.page_shape, dtype=k.dtype,
                                pin_memory=self.device.type == "cuda") if num_host_slots else None
        self.disk = disk
        self._read: dict[bytes, torch.Tensor] = {}  # pages read from disk, waiting for their LOAD_DISK
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.bytes_per_page = int(np.prod(self.page_shape)) * k.element_size()
        self.pages_moved = {kind.name.lower(): 0 for kind in TransferKind}

    def stats(self) -> dict[str, int | float]:
        """Pages moved per transfer kind, with bytes, and the disk tier's counts and seconds."""
        moved = {f"kv_transfer_pages_{kind}": n for kind, n in self.pages_moved.items()}
        moved.update(kv_host_bytes_offloaded=self.pages_moved["offload"] * self.bytes_per_page,
                     kv_host_bytes_loaded=self.pages_moved["load"] * self.bytes_per_page)
        if self.disk is not None:
            moved.update(self.disk.counts, **self.disk.seconds)
        return moved

    @property
    def num_host_slots(self) -> int:
        return 0 if self.host is None else self.host.shape[0]

    def run(self, transfers: list[KVTransfer]) -> None:
        """Run transfers in order; on CUDA queued on the transfer stream, the compute stream waiting for them."""
        if self.stream is None:
            for transfer in transfers:
                self._run(transfer)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            for transfer in transfers:
                self._run(transfer)
        compute.wait_stream(self.stream)

    def _run(self, transfer: KVTransfer) -> None:
        kind, src, dst = transfer.kind, transfer.src, transfer.dst
        self.pages_moved[kind.name.lower()] += len(src)
        if kind is TransferKind.COPY:
            self.kv.copy_pages(np.stack([src, dst], axis=1))
        elif kind is TransferKind.OFFLOAD:
            pages = self.gather(src)
            for at, slot, n in runs(dst):
                self.host[slot:slot + n].copy_(pages[at:at + n], non_blocking=True)
        elif kind is TransferKind.LOAD:
            staged = torch.empty((len(src),) + self.page_shape, dtype=self.kv.k.dtype, device=self.device)
            for at, slot, n in runs(src):
                staged[at:at + n].copy_(self.host[slot:slot + n], non_blocking=True)
            self.scatter(dst, staged)
        elif kind is TransferKind.LOAD_DISK:
            keys = [bytes(key) for key in transfer.keys]
            self.scatter(dst, torch.stack([self._read.pop(key) for key in keys]).to(self.device, non_blocking=True))
        else:
            self._save(transfer)

    def read_disk_pages(self, keys: list[bytes]) -> int:
        """Read and check the files of keys, in order, up to the first missing or bad one; the pages
        wait (in host memory) for the LOAD_DISK transfer that puts them in GPU pages. Returns how many."""
        if self.disk is None:
            return 0
        for i, key in enumerate(keys):
            page = self._read.get(key)
            if page is None:
                page = self.disk.read(key)
            if page is None:
                return i
            self._read[key] = page
        return len(keys)

    def _save(self, transfer: KVTransfer) -> None:
        """Pages to disk files named by their keys. The host writes the files, so it waits for their
        copy to the host: saves come in batches (evicted nodes, the end of a batch)."""
        if self.disk is None:
            raise ValueError(f"a {transfer.kind.name} transfer without a disk tier")
        if transfer.kind is TransferKind.SAVE_GPU:
            pages = self.gather(transfer.src).to("cpu")
        else:
            if self.stream is not None:
                self.stream.synchronize()
            pages = self.host[torch.from_numpy(transfer.src.astype(np.int64))]
        for key, page in zip(transfer.keys, pages):
            self.disk.write(bytes(key), page)

    def gather(self, pages: np.ndarray) -> torch.Tensor:
        """GPU pages as [n, 2, layers, page_size, kv_heads, head_dim] (a new tensor on the device)."""
        index = torch.from_numpy(pages.astype(np.int64)).to(self.device, non_blocking=True)
        pages = torch.stack((self.kv.k.index_select(1, index), self.kv.v.index_select(1, index)))
        return pages.permute(2, 0, 1, 3, 4, 5).contiguous()

    def scatter(self, pages: np.ndarray, data: torch.Tensor) -> None:
        """Write [n, 2, layers, ...] page contents into GPU pages."""
        index = torch.from_numpy(pages.astype(np.int64)).to(self.device, non_blocking=True)
        self.kv.k.index_copy_(1, index, data[:, 0].transpose(0, 1))
        self.kv.v.index_copy_(1, index, data[:, 1].transpose(0, 1))
