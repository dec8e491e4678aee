"""The rank processes rank 0 starts: one `python -m <module>` per rank, fed by pipes.

Each rank is a fresh interpreter (not a fork, not multiprocessing's spawn, which would re-run the
user's script and pickle the arguments): its settings come as JSON on the command line, and each
step's message comes as raw bytes on its own pipe. A rank reads its next message with no timeout
(an idle server sends none) and ends when the pipe closes, so a rank never outlives rank 0. A
rank that fails writes what went wrong on its report pipe and exits; rank 0 names it.
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
STOP_WAIT_S = 10.0  # a rank told to stop gets this long to exit before it is killed
REPORT_WAIT_S = 2.0  # how long rank 0 waits for a failed rank's own report


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or failed; the message names it."""


def _write_frame(fd: int, payload: bytes) -> None:
    data = memoryview(_LENGTH.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> bytes | None:
    """The next message, or None once the writer has gone."""
    header = _read_exactly(fd, _LENGTH.size)
    return None if header is None else _read_exactly(fd, _LENGTH.unpack(header)[0])


class RankLink:
    """A rank's end of its pipes: messages in from rank 0, a failure report out."""

    def __init__(self, messages_fd: int, report_fd: int) -> None:
        self.messages_fd, self.report_fd = messages_fd, report_fd

    def receive(self) -> bytes | None:
        """The next message from rank 0 (waits as long as it takes); None when rank 0 has gone."""
        return _read_frame(self.messages_fd)

    def report(self, text: str) -> None:
        try:
            _write_frame(self.report_fd, text.encode("utf-8", "replace"))
        except OSError:
            pass  # rank 0 is gone: nobody to tell


class RankProcesses:
    """Ranks 1..size-1 of a group, as child processes of rank 0."""

    def __init__(self, module: str, size: int, settings: dict[str, Any]) -> None:
        """Start `python -m module --rank r --settings JSON --messages-fd A --report-fd B` per rank."""
        self.size = size
        self.processes: list[subprocess.Popen] = []
        self._message_fds: list[int] = []
        self._report_fds: list[int] = []
        self.failure: str | None = None
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # the same forkserve in every rank
        env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
        try:
            for rank in range(1, size):
                message_read, message_write = os.pipe()
                report_read, report_write = os.pipe()
                command = [sys.executable, "-m", module, "--rank", str(rank), "--settings", json.dumps(settings),
                           "--messages-fd", str(message_read), "--report-fd", str(report_write)]
                self.processes.append(subprocess.Popen(command, env=env, pass_fds=(message_read, report_write)))
                os.close(message_read)
                os.close(report_write)
                self._message_fds.append(message_write)
                self._report_fds.append(report_read)
        except BaseException:
            self.stop()
            raise
        logger.info("started tensor-parallel ranks 1..%d (pids %s)", size - 1, [p.pid for p in self.processes])

    def send(self, message: bytes) -> None:
        """The same message to every rank (one step's plan); raises RankFailure naming a rank that is gone."""
        self.check()
        for rank, fd in enumerate(self._message_fds, start=1):
            try:
                _write_frame(fd, message)
            except OSError as error:
                raise self.fail(error) from error

    def check(self) -> None:
        """Raise the earlier failure again (the ranks were stopped then)."""
        if self.failure is not None:
            raise RankFailure(self.failure)

    def fail(self, error: BaseException) -> RankFailure:
        """After a collective or a send failed: find the rank that died or reported, stop them all,
        and give the error to raise (it names the rank, or says none was found dead)."""
        if self.failure is None:
            deadline = time.monotonic() + REPORT_WAIT_S
            while time.monotonic() < deadline and all(p.poll() is None for p in self.processes):
                time.sleep(0.05)
            causes = [cause for rank in range(1, self.size) if (cause := self._cause(rank))]
            self.failure = "; ".join(causes) if causes else \
                f"a collective with the tensor-parallel ranks failed, and none of them has exited: {error}"
            self.failure += " (every rank was stopped: build a new engine)"
            self.stop()
        return RankFailure(self.failure)

    def _cause(self, rank: int) -> str | None:
        process = self.processes[rank - 1]
        code = process.poll()
        report = None
        if code is not None:
            fd = self._report_fds[rank - 1]
            if select.select([fd], [], [], 0)[0]:
                report = _read_frame(fd)
        if report:
            return f"tensor-parallel rank {rank} failed: {report.decode('utf-8', 'replace')}"
        if code is None:
            return None
        how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return f"tensor-parallel rank {rank} (pid {process.pid}) {how}"

    def stop(self) -> None:
        """End every rank: closing its message pipe tells it to exit; one that does not is killed."""
        self.failure = self.failure or "the tensor-parallel ranks were stopped"
        for fd in self._message_fds:
            os.close(fd)
        self._message_fds = []
        deadline = time.monotonic() + STOP_WAIT_S
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for fd in self._report_fds:
            os.close(fd)
        self._report_fds = []
