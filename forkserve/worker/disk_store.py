"""The disk tier: KV pages as safetensors files named by content key, shared by processes and runs.

A page's file is `<kv_cache_dir>/<model identity>/<key hex>.safetensors`, one tensor "kv" of
[2 (K, V), layers, page_size, kv_heads, head_dim] and metadata naming the format version, the
model identity, the key and a blake2b checksum of the tensor's bytes. The model identity
(`model_identity`) covers everything that makes two caches' KV differ: the config, a fingerprint
of the weights files (or the dummy weights' seed), dtype, KV layout, page size and format version.

Writes go to a temporary name in the same directory, are fsynced and renamed, so a reader (this
process, another one, a process after a kill -9) sees a whole file or none; no lock is held. A
file that cannot be read, is truncated, or names another model, key or format is never served:
it is skipped with one warning naming it, removed (so that it is written again) and its pages
recomputed. Past `max_bytes` the least recently used files (by mtime; a read touches its file) go.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

logger = logging.getLogger(__name__)

FORMAT_VERSION = "forkserve-kv-1"
SAMPLE_BYTES = 1 << 20  # of each weights file's start and end in its fingerprint


def weights_fingerprint(model_dir: str | Path, load_format: str) -> str:
    """The weights' identity: the dummy weights' seed, or each safetensors file's name, size, and
    first and last MiB (cheap on a 16 GB checkpoint, and any retrained weights differ there)."""
    if load_format == "dummy":
        return "dummy-seed-0"
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(max(size - SAMPLE_BYTES, 0))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def model_identity(model_dir: str | Path, load_format: str, dtype: torch.dtype, page_shape: tuple[int, ...]) -> str:
    """What two processes must share to use each other's KV files (hex, 32 characters)."""
    config = (Path(model_dir) / "config.json").read_bytes()
    parts = [FORMAT_VERSION, hashlib.blake2b(config, digest_size=16).hexdigest(),
             weights_fingerprint(model_dir, load_format), str(dtype), "x".join(map(str, page_shape))]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


def _checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class DiskStore:
    """Pages in files under `root / identity`, written atomically, read only when they check out."""

    def __init__(self, root: str | Path, identity: str, page_shape: tuple[int, ...], dtype: torch.dtype,
                 max_bytes: int | None = None) -> None:
        self.dir = Path(root) / identity
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.page_shape = tuple(page_shape)
        self.dtype = dtype
        self.max_bytes = max_bytes
        self._bytes = sum(p.stat().st_size for p in self.dir.glob("*.safetensors"))
        self.counts = dict(disk_pages_written=0, disk_bytes_written=0, disk_pages_read=0, disk_bytes_read=0,
                           disk_files_skipped=0, disk_files_removed=0)
        self.seconds = dict(disk_write_seconds=0.0, disk_read_seconds=0.0)

    def path(self, key: bytes) -> Path:
        return self.dir / f"{key.hex()}.safetensors"

    def count_present(self, keys: list[bytes]) -> int:
        """How many leading keys have a file (not yet checked: `read` checks)."""
        for i, key in enumerate(keys):
            if not self.path(key).exists():
                return i
        return len(keys)

    def write(self, key: bytes, page: torch.Tensor) -> None:
        """Write one page's file unless it is there already (same key and model: same KV)."""
        path = self.path(key)
        if path.exists():
            return
        started = time.perf_counter()
        page = page.to("cpu", self.dtype).contiguous()
        data = page.view(torch.uint8).numpy().tobytes()
        blob = save_tensors({"kv": page}, metadata=dict(format=FORMAT_VERSION, model=self.identity, key=key.hex(),
                                                        checksum=_checksum(data)))
        fd, tmp = tempfile.mkstemp(prefix=f".{key.hex()}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as error:
            logger.warning("could not write KV cache file %s: %s", path, error)
            Path(tmp).unlink(missing_ok=True)
            return
        self.counts["disk_pages_written"] += 1
        self.counts["disk_bytes_written"] += len(blob)
        self.seconds["disk_write_seconds"] += time.perf_counter() - started
        self._bytes += len(blob)
        if self.max_bytes is not None and self._bytes > self.max_bytes:
            self._trim()

    def read(self, key: bytes) -> torch.Tensor | None:
        """The page of `key`, or None: missing, or bad (then warned about once and removed)."""
        path = self.path(key)
        started = time.perf_counter()
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                page = f.get_tensor("kv")
        except FileNotFoundError:
            return None
        except Exception as error:  # safetensors raises its own errors on truncated or garbled files
            return self._skip(path, f"unreadable ({type(error).__name__}: {error})")
        wanted = dict(format=FORMAT_VERSION, model=self.identity, key=key.hex())
        wrong = [name for name, value in wanted.items() if meta.get(name) != value]
        if wrong:
            return self._skip(path, f"its {', '.join(wrong)} differ(s) from this engine's")
        if tuple(page.shape) != self.page_shape or page.dtype != self.dtype:
            return self._skip(path, f"holds {page.dtype} {tuple(page.shape)}, not {self.dtype} {self.page_shape}")
        if _checksum(page.view(torch.uint8).numpy().tobytes()) != meta.get("checksum"):
            return self._skip(path, "its checksum does not match its contents")
        os.utime(path)  # recently used: the size bound removes it last
        self.counts["disk_pages_read"] += 1
        self.counts["disk_bytes_read"] += page.numel() * page.element_size()
        self.seconds["disk_read_seconds"] += time.perf_counter() - started
        return page

    def _skip(self, path: Path, why: str) -> None:
        logger.warning("skipping KV cache file %s: %s; its pages are recomputed", path, why)
        self.counts["disk_files_skipped"] += 1
        path.unlink(missing_ok=True)
        return None

    def _trim(self) -> None:
        """Remove least recently used files until the directory is under 90% of its bound."""
        files = []
        for path in self.dir.glob("*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        files.sort()
        self._bytes = sum(size for _, size, _ in files)
        for _, size, path in files:
            if self._bytes <= 0.9 * self.max_bytes:
                break
            path.unlink(missing_ok=True)
            self._bytes -= size
            self.counts["disk_files_removed"] += 1
