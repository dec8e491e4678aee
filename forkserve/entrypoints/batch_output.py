"""The batch runner's output file: recovering, compacting, locking and appending to it, apart from running the batch."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class OutputUnusable(ValueError):
    """The output file is locked by another runner, or cannot be written (permissions, space)."""


@dataclass
class RecoveredOutput:
    """What an output file holds: custom_id -> fingerprint of each answered request (a later
    record of a custom_id supersedes an earlier one; None for records written before
    fingerprints), and how many records, superseded ones included."""

    answered: dict[str, str | None] = field(default_factory=dict)
    num_records: int = 0
    failed: set[str] = field(default_factory=set)  # custom_ids whose last record is an error


def recover_output(path: str | Path) -> RecoveredOutput:
    """Read an output file's records; cuts a torn last line off first."""
    path = Path(path)
    recovered = RecoveredOutput()
    if not path.exists():
        return recovered
    answered = recovered.answered
    complete = 0  # bytes up to the end of the last complete line
    with open(path, "r+b") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break  # torn: a kill in mid-write
            complete += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                custom_id = record["custom_id"]
                answered[custom_id] = record.get("fingerprint")
                recovered.num_records += 1
                if record.get("error") is not None:
                    recovered.failed.add(custom_id)
                else:
                    recovered.failed.discard(custom_id)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{path}: line {line_no} is not a batch result line; "
                                 "refusing to append to this file") from None
        size = f.seek(0, os.SEEK_END)
        if complete < size:
            logger.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run",
                           path, size - complete)
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    return recovered


def compact_output(path: str | Path) -> int:
    """Drop superseded records (all but the last of each custom_id), rewriting the file atomically
    line by line (outputs with logprobs can be larger than memory); returns how many were dropped.
    Records keep their order."""
    path = Path(path)
    if not path.exists():
        return 0

    def custom_ids():
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    yield raw, json.loads(raw)["custom_id"]

    last: dict[str, int] = {}
    for i, (_, custom_id) in enumerate(custom_ids()):
        last[custom_id] = i
    dropped = sum(1 for _ in custom_ids()) - len(last)
    if dropped:
        temporary = path.with_name(path.name + ".compacting")
        with open(temporary, "wb") as f:
            for i, (raw, custom_id) in enumerate(custom_ids()):
                if last[custom_id] == i:
                    f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    return dropped


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class OutputLock:
    """`<output>.lock`, held with fcntl.flock while a runner owns the output, naming its pid.

    The lock file stays after the run (removing it would let a third runner lock a different
    file than a second one waiting on it); the lock, not the file, is what counts.
    """

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(output.name + ".lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputUnusable(f"{output} is being written by another run-batch (pid {holder}, holding "
                                 f"{self.path}): wait for it to finish, or give another -o") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def drop_results(path: Path, custom_ids: set[str]) -> None:
    """Rewrite the output file without the results of `custom_ids`: a new file, fsynced, renamed
    over the old one, so a kill at any moment leaves either file whole."""
    kept = [raw for raw in path.read_bytes().splitlines(keepends=True)
            if raw.strip() and json.loads(raw)["custom_id"] not in custom_ids]
    temporary = path.with_name(path.name + ".retry")
    with open(temporary, "wb") as f:
        f.write(b"".join(kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


class ResultWriter:
    """Appends whole lines; each `write` is one os.write of complete lines, then an fsync.

    An OSError (a full disk) becomes OutputUnusable: the lines written so far stay (a torn last
    one is cut by the next run), and a rerun resumes.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if created:  # make the new directory entry durable too
                _fsync_directory(self.path.parent)
        except OSError as err:
            raise _unwritable(self.path, err) from None

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = memoryview(b"".join(json.dumps(r).encode("utf-8") + b"\n" for r in records))
        try:
            while data:
                data = data[os.write(self.fd, data):]
            os.fsync(self.fd)
        except OSError as err:
            raise _unwritable(self.path, err) from None

    def close(self) -> None:
        os.close(self.fd)


def _unwritable(path: Path, err: OSError) -> OutputUnusable:
    return OutputUnusable(f"cannot write results to {path}: {err.strerror or err}; the results written so far "
                          "are kept: fix that and rerun the same command to resume")


def parts_directory(output: Path) -> Path:
    """Where data-parallel replicas append their results (`<output>.parts/`) until the driver merges them."""
    return output.with_name(output.name + ".parts")


def merge_parts(output: Path, input_order: list[str]) -> int:
    """Fold the replicas' part files into `output`, in input order, each custom_id once; returns
    the records taken from the parts.

    The parts are newer than the output, so a custom_id's record in a part supersedes the
    output's (later part files, by name, supersede earlier ones). Records of custom_ids not in
    `input_order` follow in the order read. The new output is written whole, fsynced and renamed
    over the old one before the parts are deleted, so a kill at any moment loses nothing and a
    rerun merges again to the same file. Torn last lines of parts (a replica killed mid-write) are
    cut first. Holds the records in memory.
    """
    directory = parts_directory(output)
    if not directory.is_dir():
        return 0
    parts = sorted(directory.glob("*.jsonl"))
    records: dict[str, bytes] = {}
    taken = 0
    for i, path in enumerate([output, *parts]):
        if not path.exists():
            continue
        recover_output(path)  # cuts a torn last line, refuses a file that is not results
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    custom_id = json.loads(raw)["custom_id"]
                    records.pop(custom_id, None)  # re-inserted last: a superseding record keeps its place
                    records[custom_id] = raw
                    taken += i > 0
    rank = {custom_id: k for k, custom_id in enumerate(input_order)}
    ordered = sorted(records, key=lambda cid: rank.get(cid, len(rank)))
    temporary = output.with_name(output.name + ".merging")
    with open(temporary, "wb") as f:
        f.write(b"".join(records[cid] for cid in ordered))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, output)
    _fsync_directory(output.parent)
    for path in parts:
        path.unlink()
    directory.rmdir()
    _fsync_directory(output.parent)
    if taken:
        logger.info("%s: merged %d record(s) from %d replica part file(s)", output, taken, len(parts))
    return taken
