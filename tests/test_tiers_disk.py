"""The disk tier's files (worker/disk_store.py): pages come back as written, through the worker's
transfers too; a truncated, corrupt or foreign file is skipped with one warning naming it, never
served; a process killed while writing leaves no torn file; the size bound removes old files."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from forkserve.worker.disk_store import DiskStore, model_identity
from forkserve.worker.kv_cache import KVCache
from forkserve.worker.plan import KVTransfer, TransferKind
from forkserve.worker.transfers import KVTransfers

PAGE_SHAPE = (2, 3, 2, 1, 4)  # K/V, layers, page_size, kv heads, head_dim


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def store(root: Path, identity: str = "a" * 32, **kwargs) -> DiskStore:
    return DiskStore(root, identity, PAGE_SHAPE, torch.float32, **kwargs)


def page(i: int) -> torch.Tensor:
    return torch.arange(int(np.prod(PAGE_SHAPE)), dtype=torch.float32).reshape(PAGE_SHAPE) + 1000 * i


def test_pages_come_back_as_written_and_are_counted(tmp_path: Path) -> None:
    disk = store(tmp_path)
    for i in range(3):
        disk.write(key(i), page(i))
    disk.write(key(0), page(7))  # already there: same key, same KV
    assert disk.count_present([key(0), key(1), key(5), key(2)]) == 2
    assert torch.equal(disk.read(key(1)), page(1)) and torch.equal(store(tmp_path).read(key(0)), page(0))
    assert disk.read(key(9)) is None
    assert disk.counts["disk_pages_written"] == 3 and disk.counts["disk_pages_read"] == 1
    assert not list(disk.dir.glob("*.tmp"))


def test_bad_files_are_skipped_with_one_warning_naming_them(tmp_path: Path, caplog) -> None:
    disk = store(tmp_path)
    for i in range(4):
        disk.write(key(i), page(i))
    truncated, corrupt, foreign = disk.path(key(0)), disk.path(key(1)), disk.path(key(2))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    data = bytearray(corrupt.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the values: only the checksum sees it
    corrupt.write_bytes(bytes(data))
    other = store(tmp_path / "other", identity="b" * 32)
    other.write(key(2), page(2))
    os.replace(other.path(key(2)), foreign)  # another model's file under this model's name
    with caplog.at_level(logging.WARNING, logger="forkserve.worker.disk_store"):
        assert [disk.read(key(i)) is None for i in range(4)] == [True, True, True, False]
    warnings = [r.getMessage() for r in caplog.records]
    for path in (truncated, corrupt, foreign):
        assert sum(str(path) in w for w in warnings) == 1, warnings
    assert "checksum" in warnings[1] and "model" in warnings[2]
    assert disk.counts["disk_files_skipped"] == 3 and not truncated.exists()  # removed: written again next time


def test_the_identity_covers_weights_dtype_and_layout(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    base = model_identity(tmp_path, "auto", torch.float32, PAGE_SHAPE)
    assert base == model_identity(tmp_path, "auto", torch.float32, PAGE_SHAPE)
    assert base != model_identity(tmp_path, "auto", torch.bfloat16, PAGE_SHAPE)
    assert base != model_identity(tmp_path, "auto", torch.float32, (2, 3, 4, 1, 4))
    assert base != model_identity(tmp_path, "dummy", torch.float32, PAGE_SHAPE)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 100)
    assert base != model_identity(tmp_path, "auto", torch.float32, PAGE_SHAPE)


WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_tiers_disk import key, page, store
from pathlib import Path
disk = store(Path({root!r}))
print("ready", flush=True)
i = 0
while True:
    disk.write(key(i % 400), page(i % 400))
    i += 1
"""


def test_kill_9_while_writing_leaves_no_torn_file(tmp_path: Path) -> None:
    code = WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=dict(os.environ))
    assert writer.stdout.readline().strip() == b"ready"
    time.sleep(0.4)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    disk = store(tmp_path)
    written = [i for i in range(400) if disk.path(key(i)).exists()]
    assert written, "the writer wrote nothing before it was killed"
    for i in range(400):
        got = disk.read(key(i))
        assert got is None if i not in written else torch.equal(got, page(i))
    assert disk.counts["disk_files_skipped"] == 0


def test_the_size_bound_removes_least_recently_used_files(tmp_path: Path) -> None:
    disk = store(tmp_path)
    disk.write(key(0), page(0))
    file_bytes = disk.path(key(0)).stat().st_size
    bounded = store(tmp_path, max_bytes=int(3.5 * file_bytes))
    for i in range(1, 3):
        bounded.write(key(i), page(i))
        os.utime(bounded.path(key(i)), (i * 10, i * 10))
    os.utime(bounded.path(key(0)), (100, 100))  # read most recently
    bounded.write(key(3), page(3))  # four files: over the bound
    assert [bounded.path(key(i)).exists() for i in range(4)] == [True, False, True, True]


def test_pages_travel_gpu_to_disk_and_back_through_transfers(tmp_path: Path) -> None:
    cache = KVCache(6, 2, 3, 1, 4, torch.float32, torch.device("cpu"))
    cache.k.normal_(), cache.v.normal_()
    before = cache.k.clone(), cache.v.clone()
    transfers = KVTransfers(cache, num_host_slots=2, disk=store(tmp_path))
    keys = np.frombuffer(key(1) + key(2) + key(3), dtype=np.uint8).reshape(3, 16)
    transfers.run([KVTransfer(TransferKind.OFFLOAD, np.array([4], np.int32), np.array([1], np.int32)),
                   KVTransfer(TransferKind.SAVE_GPU, np.array([1, 2], np.int32), np.array([-1, -1], np.int32),
                              keys[:2]),
                   KVTransfer(TransferKind.SAVE_HOST, np.array([1], np.int32), np.array([-1], np.int32), keys[2:])])
    fresh = KVCache(6, 2, 3, 1, 4, torch.float32, torch.device("cpu"))
    reader = KVTransfers(fresh, disk=store(tmp_path))
    assert reader.read_disk_pages([key(1), key(2), key(3), key(4)]) == 3
    reader.run([KVTransfer(TransferKind.LOAD_DISK, np.array([-1, -1, -1], np.int32), np.array([0, 3, 5], np.int32),
                           keys)])
    for got, want in zip((fresh.k, fresh.v), before):
        assert torch.equal(got[:, [0, 3, 5]], want[:, [1, 2, 4]])
