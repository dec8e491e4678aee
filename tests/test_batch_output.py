"""run-batch's output file (issue 24): one runner per file (an advisory lock naming its pid, two
real processes), a read-only or full output directory refused before the model loads and a full
disk mid-run a clear error that a rerun resumes from, request fingerprints (a changed request is
re-run and its old record superseded), malformed lines keyed by their bytes."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from forkserve.cli import main
from forkserve.config import EngineConfig
from forkserve.engine.engine import Engine
from forkserve.entrypoints import batch_output, batch_runner
from forkserve.entrypoints.batch_output import OutputUnusable, compact_output
from forkserve.entrypoints.batch_runner import MALFORMED, BatchRunner

ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-num-seqs", "2", "--num-gpu-blocks-override", "256"]


def line(custom_id: str, prompt: str, max_tokens: int = 3) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}})


def records(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def run_cli(model_dir: str, inp: Path, out: Path) -> int:
    return main(["run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir, "--no-progress", *ENGINE_FLAGS])


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


def test_second_runner_is_refused_naming_the_holder(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(line("a", "x") + "\n")
    with BatchRunner(inp, out):
        with pytest.raises(OutputUnusable, match=f"another run-batch \\(pid {os.getpid()}"):
            BatchRunner(inp, out)
    BatchRunner(inp, out).close()  # released: the next one may


def test_two_processes_on_one_output_never_duplicate(model_dir: str, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(line(f"q{i}", f"Question {i}:", max_tokens=16) for i in range(16)) + "\n")
    command = [sys.executable, "-m", "forkserve", "run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir,
               "--no-progress", *ENGINE_FLAGS]
    # Started together: one runs, the other is refused or (if it came second) finds all answered.
    both = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    deadline = time.monotonic() + 120
    while not out.exists():  # a runner holds the lock from before its model loads to its end
        assert time.monotonic() < deadline and any(p.poll() is None for p in both)
        time.sleep(0.005)
    if any(p.poll() is None for p in both):
        with pytest.raises(OutputUnusable, match="another run-batch \\(pid \\d+"):
            BatchRunner(inp, out)  # a third, while one of them runs
    results = [(p.wait(120), p.stderr.read().decode()) for p in both]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or "is being written by another run-batch (pid" in err, err
    ids = [r["custom_id"] for r in records(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(16))


def test_read_only_or_full_directory_refused_before_the_model(model_dir: str, tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(line("a", "x") + "\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert run_cli(model_dir, inp, blocked / "out.jsonl") == 2  # its directory cannot be made
    assert "cannot create the output directory" in capsys.readouterr().err
    with monkeypatch.context() as patch:  # a read-only directory (chmod does not stop root, who runs CI here)
        patch.setattr(batch_runner.os, "access", lambda path, mode: False)
        assert run_cli(model_dir, inp, tmp_path / "out.jsonl") == 2
        assert "is not writable" in capsys.readouterr().err
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(batch_runner.shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    monkeypatch.setattr("forkserve.entrypoints.commands._build_engine",
                        lambda args: pytest.fail("the model loaded before the output was checked"))
    assert run_cli(model_dir, inp, tmp_path / "out.jsonl") == 2
    assert "MiB free" in capsys.readouterr().err


def test_full_disk_mid_run_is_a_clear_error_and_resumes(model_dir: str, tmp_path: Path, monkeypatch, capsys) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(line(f"r{i}", f"Numbers: {i}", max_tokens=2 + i) for i in range(4)) + "\n")
    real_write, writes = os.write, []

    def filling_write(fd: int, data) -> int:
        if fd != 2 and len(writes) >= 1 and data[:1] == b"{":  # the second batch of records: no space left
            real_write(fd, bytes(data[:10]))  # a torn start, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(batch_output.os, "write", filling_write)
    assert run_cli(model_dir, inp, out) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "rerun" in err and "Traceback" not in err
    monkeypatch.undo()
    assert run_cli(model_dir, inp, out) == 0
    assert sorted(r["custom_id"] for r in records(out)) == ["r0", "r1", "r2", "r3"]


def test_changed_requests_are_rerun_and_superseded(model_dir: str, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([line("a", "Numbers: 1"), line("b", "Numbers: 2"), "{not json", line("c", "Hi")]) + "\n")
    assert run_cli(model_dir, inp, out) == 0
    first = {r["custom_id"]: r for r in records(out)}
    malformed = [cid for cid in first if cid.startswith(MALFORMED)]
    assert len(first) == 4 and len(malformed) == 1 and all(r["fingerprint"] for r in first.values())

    # b changes, the line above the malformed one goes: b re-runs, the malformed line keeps its key
    inp.write_text("\n".join([line("b", "Numbers: 2", max_tokens=5), "{not json", line("c", "Hi")]) + "\n")
    engine = Engine(EngineConfig.from_kwargs(model_dir, device="cpu", dtype="float32", num_gpu_blocks_override=256))
    with BatchRunner(inp, out) as runner:
        assert (runner.remaining, runner.rerun, runner.skipped) == (1, 1, 2)
        summary = runner.run(engine, [model_dir], use_tqdm=False)
    assert summary.rerun == 1 and "1 re-run (changed since)" in summary.describe(out)
    after = records(out)
    assert [r["custom_id"] for r in after].count("b") == 1  # superseded record dropped
    by_id = {r["custom_id"]: r for r in after}
    assert by_id["b"]["response"]["body"]["usage"]["completion_tokens"] == 5
    assert by_id["a"] == first["a"] and by_id[malformed[0]] == first[malformed[0]] and by_id["c"] == first["c"]


def test_a_kill_before_compaction_leaves_the_later_record_counting(tmp_path: Path) -> None:
    """A run killed after re-running a changed request but before compacting: the later record
    counts, and the next run (with nothing left to do) compacts."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(line("a", "x") + "\n" + line("b", "y") + "\n")
    fingerprints = {r.custom_id: r.fingerprint for r in batch_runner.read_batch_input(inp)}
    old = {"id": "batch_req_1", "custom_id": "a", "response": None, "error": {"code": "x", "message": "old"},
           "fingerprint": "an older request"}
    other = {**old, "custom_id": "b", "fingerprint": fingerprints["b"]}
    new = {**old, "id": "batch_req_2", "fingerprint": fingerprints["a"], "error": {"code": "x", "message": "new"}}
    out.write_text("".join(json.dumps(r) + "\n" for r in (old, other, new)))
    recovered = batch_output.recover_output(out)
    assert recovered.answered == {"a": fingerprints["a"], "b": fingerprints["b"]} and recovered.num_records == 3
    with BatchRunner(inp, out) as runner:
        assert runner.remaining == 0
        runner.compact()
    assert records(out) == [other, new]
    assert compact_output(out) == 0


def test_empty_api_key_is_refused_at_start(model_dir: str, monkeypatch, capsys) -> None:
    pytest.importorskip("fastapi")
    from forkserve.entrypoints.engine_loop import EngineLoop
    from forkserve.entrypoints.server import build_app

    monkeypatch.setattr("forkserve.entrypoints.commands._build_engine",
                        lambda args: pytest.fail("the model loaded with an empty key"))
    assert main(["serve", "--model", model_dir, "--api-key", ""]) == 2
    assert "API key is empty" in capsys.readouterr().err
    monkeypatch.setenv("FORKSERVE_API_KEY", "")
    assert main(["serve", "--model", model_dir]) == 2
    assert "API key is empty" in capsys.readouterr().err
    engine = Engine(EngineConfig.from_kwargs(model_dir, device="cpu", dtype="float32", num_gpu_blocks_override=256))
    with pytest.raises(ValueError, match="API key is empty"):
        build_app(EngineLoop(engine), ["tiny"], api_key=" ")


def test_merge_parts_in_input_order_each_custom_id_once(tmp_path: Path) -> None:
    """Replica part files fold into the output: input order, a part's record supersedes the
    output's, a torn part tail is cut, strays go last, the parts are gone, and a repeat is a no-op."""
    from forkserve.entrypoints.batch_output import merge_parts, parts_directory

    def record(custom_id: str, text: str) -> bytes:
        return (json.dumps({"custom_id": custom_id, "response": {"body": text}, "error": None}) + "\n").encode()

    out = tmp_path / "out.jsonl"
    out.write_bytes(record("c", "old") + record("stray", "s"))
    parts = parts_directory(out)
    parts.mkdir()
    (parts / "x-replica-0.jsonl").write_bytes(record("b", "b") + record("c", "new"))
    (parts / "x-replica-1.jsonl").write_bytes(record("a", "a") + b'{"custom_id": "d", "resp')
    assert merge_parts(out, ["a", "b", "c", "d"]) == 3
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["custom_id"], r["response"]["body"]) for r in merged] == [("a", "a"), ("b", "b"), ("c", "new"),
                                                                         ("stray", "s")]
    assert not parts.exists()
    before = out.read_bytes()
    assert merge_parts(out, ["a", "b", "c", "d"]) == 0 and out.read_bytes() == before
