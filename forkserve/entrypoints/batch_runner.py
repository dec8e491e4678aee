"""`forkserve run-batch`: an OpenAI Batch API input file in, one result line per request out.

Input lines: {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}. Output lines, in the order requests finish:
{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id", "body"},
"error": null}, or "response": null with "error": {"code", "message"} for a request that could
not run (bad JSON, unknown url, invalid body); a line without a custom_id is named "line N".

Every valid request of the file goes to the engine as one batch before the first step
(`Engine.add_requests`), so the planner sees the whole file: each prefix its prompts share is
prefilled once.

Resuming: each result line is appended with one write and fsynced when its request finishes.
A rerun with the same output file reads it first, cuts a torn last line (a kill in mid-write)
back to the last newline, and runs only the custom_ids not yet answered. So after a kill -9 at
any moment, reruns end with every custom_id exactly once. A line whose stored result is an
error counts as answered; `retry_failed` takes those results out of the file (rewritten whole,
then renamed over it) and runs their lines again.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from forkserve.entrypoints.openai_protocol import (URLS, OpenAIError, OpenAIRequest, check_model, make_prompts,
                                                   new_id, parse_request, response_body)
from forkserve.engine.engine import PromptInput
from forkserve.engine.summary import batch_summary, describe
from forkserve.outputs import RequestOutput

logger = logging.getLogger(__name__)


class DuplicateCustomIds(ValueError):
    """The input names some custom_id more than once: refused before any work."""


@dataclass
class BatchLine:
    """One non-blank input line: its key, and either the request or why it cannot run."""

    line_no: int
    custom_id: str  # "line N" when the line has no usable custom_id
    url: str | None = None
    body: Any = None
    error: tuple[str, str] | None = None  # (code, message)


@dataclass
class BatchSummary:
    total: int = 0  # request lines in the input
    skipped: int = 0  # already answered in the output file before this run
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def prefix_reuse(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def describe(self, output: Path | str) -> str:
        rate = self.generated_tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"run-batch: {self.total} requests: {self.succeeded} succeeded, {self.failed} failed, "
                f"{self.skipped} already in {output}; {self.prompt_tokens} prompt tokens "
                f"({self.prefix_reuse:.1%} from the prefix cache), {self.generated_tokens} generated tokens "
                f"in {self.seconds:.1f} s ({rate:.1f} tokens/s)")


def read_batch_input(path: str | Path) -> list[BatchLine]:
    """Parse every line; a line that cannot be a request becomes a BatchLine with an error.

    Raises DuplicateCustomIds when a custom_id appears on more than one line.
    """
    lines: list[BatchLine] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                lines.append(_parse_line(line_no, raw))
    seen: dict[str, list[int]] = {}
    for line in lines:
        seen.setdefault(line.custom_id, []).append(line.line_no)
    duplicates = {cid: nums for cid, nums in seen.items() if len(nums) > 1}
    if duplicates:
        listed = "; ".join(f"{cid!r} on lines {', '.join(map(str, nums))}" for cid, nums in duplicates.items())
        raise DuplicateCustomIds(f"{path}: duplicate custom_id(s), every request needs its own: {listed}")
    return lines


def _parse_line(line_no: int, raw: bytes) -> BatchLine:
    key = f"line {line_no}"
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return BatchLine(line_no, key, error=("invalid_json", f"line {line_no} is not valid JSON: {err}"))
    if not isinstance(obj, dict):
        return BatchLine(line_no, key, error=("invalid_request", f"line {line_no} must be a JSON object"))
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLine(line_no, key,
                         error=("invalid_request", f"line {line_no}: custom_id must be a non-empty string"))
    line = BatchLine(line_no, custom_id, obj.get("url"), obj.get("body"))
    method = obj.get("method", "POST")
    if method != "POST":
        line.error = ("invalid_method", f"method must be POST, got {method!r}")
    elif line.url not in URLS:
        line.error = ("invalid_url", f"unknown url {line.url!r}: expected one of {', '.join(URLS)}")
    elif not isinstance(line.body, dict):
        line.error = ("invalid_request", "body must be a JSON object")
    return line


def recover_output(path: str | Path) -> set[str]:
    """custom_ids already answered in an output file; cuts a torn last line off first."""
    path = Path(path)
    if not path.exists():
        return set()
    answered: set[str] = set()
    complete = 0  # bytes up to the end of the last complete line
    with open(path, "r+b") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break  # torn: a kill in mid-write
            complete += len(raw)
            if not raw.strip():
                continue
            try:
                custom_id = json.loads(raw)["custom_id"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}: line {line_no} is not a batch result line; "
                                 "refusing to append to this file") from None
            answered.add(custom_id)
        size = f.seek(0, os.SEEK_END)
        if complete < size:
            logger.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run",
                           path, size - complete)
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    return answered


def failed_ids(path: str | Path) -> set[str]:
    """custom_ids whose stored result in an output file is an error."""
    path = Path(path)
    if not path.exists():
        return set()
    failed = set()
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                record = json.loads(raw)
                if record.get("error") is not None:
                    failed.add(record["custom_id"])
    return failed


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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ResultWriter:
    """Appends whole lines; each `write` is one os.write of complete lines, then an fsync."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:  # make the new directory entry durable too
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        data = memoryview(b"".join(json.dumps(r).encode("utf-8") + b"\n" for r in records))
        while data:
            data = data[os.write(self.fd, data):]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def success_record(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None}


def error_record(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


@dataclass
class _Job:
    custom_id: str
    request: OpenAIRequest
    prompts: list[PromptInput]
    outputs: dict[int, RequestOutput] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return len(self.outputs) == len(self.prompts)


class BatchRunner:
    """Reads the input (refusing duplicates) and the output so far; `run` does the rest.

    Construction does no model work, so a bad input file fails before the engine is built, and
    `remaining == 0` means there is nothing left to run.
    """

    def __init__(self, input_path: str | Path, output_path: str | Path, retry_failed: bool = False) -> None:
        self.input_path, self.output_path = Path(input_path), Path(output_path)
        if self.output_path.exists() and self.output_path.resolve() == self.input_path.resolve():
            raise ValueError(f"the output file is the input file ({input_path}): give another -o")
        self.lines = read_batch_input(self.input_path)
        answered = recover_output(self.output_path)
        failed = failed_ids(self.output_path) & {line.custom_id for line in self.lines}
        self.retried = 0  # failed results taken out to run again (retry_failed)
        if retry_failed and failed:
            drop_results(self.output_path, failed)
            answered -= failed
            self.retried, failed = len(failed), set()
        self.failed_before = len(failed)  # answered lines whose stored result is an error
        self.todo = [line for line in self.lines if line.custom_id not in answered]
        self.skipped = len(self.lines) - len(self.todo)
        stray = answered - {line.custom_id for line in self.lines}
        if stray:
            logger.warning("%s holds %d custom_id(s) that are not in %s", self.output_path, len(stray),
                           self.input_path)

    @property
    def remaining(self) -> int:
        return len(self.todo)

    def any_succeeded(self) -> bool:
        """Does the output file hold a successful result for some line of the input?"""
        ids = {line.custom_id for line in self.lines}
        return bool((recover_output(self.output_path) - failed_ids(self.output_path)) & ids)

    def run(self, engine: Any, served_model_names: list[str], use_tqdm: bool = True) -> BatchSummary:
        """Run every remaining request on `engine` (a `forkserve.engine.engine.Engine`)."""
        summary = BatchSummary(total=len(self.lines), skipped=self.skipped)
        start = time.perf_counter()
        writer = ResultWriter(self.output_path)
        try:
            with tqdm(total=len(self.lines), initial=self.skipped, desc="run-batch", unit="req",
                      disable=not use_tqdm, dynamic_ncols=True) as bar:
                jobs, errors = self._validate(engine, served_model_names)
                writer.write(errors)
                summary.failed += len(errors)
                bar.update(len(errors))
                owners: dict[str, tuple[_Job, int]] = {}
                batch = []
                for j, job in enumerate(jobs):
                    for p, prompt in enumerate(job.prompts):
                        request_id = f"{j}.{p}"
                        batch.append((request_id, prompt, job.request.params))
                        owners[request_id] = (job, p)
                before = engine.stats()
                engine.add_requests(batch)
                while engine.has_unfinished_requests():
                    records = []
                    for output in engine.step():
                        job, p = owners.pop(output.request_id)
                        job.outputs[p] = output
                        summary.generated_tokens += sum(len(c.token_ids) for c in output.outputs)
                        summary.prompt_tokens += len(output.prompt_token_ids)
                        summary.cached_tokens += output.num_cached_tokens
                        if job.done:
                            outputs = [job.outputs[i] for i in range(len(job.prompts))]
                            model = job.request.model or served_model_names[0]
                            body = response_body(job.request, new_id(job.request.kind), model, outputs)
                            records.append(success_record(job.custom_id, body))
                    if records:
                        writer.write(records)
                        summary.succeeded += len(records)
                        elapsed = time.perf_counter() - start
                        bar.set_postfix_str(f"{summary.generated_tokens / max(elapsed, 1e-9):.0f} tok/s, "
                                            f"prefix reuse {summary.prefix_reuse:.0%}", refresh=False)
                        bar.update(len(records))
        finally:
            writer.close()
        summary.seconds = time.perf_counter() - start
        logger.info("%s", summary.describe(self.output_path))
        logger.info("%s", describe(batch_summary(before, engine.stats(), engine.pages_in_use_series())))
        return summary

    def _validate(self, engine: Any, served: list[str]) -> tuple[list[_Job], list[dict[str, Any]]]:
        """Jobs for the valid lines, error records for the others."""
        jobs, errors = [], []
        for line in self.todo:
            if line.error is not None:
                errors.append(error_record(line.custom_id, *line.error))
                continue
            try:
                request = parse_request(URLS[line.url], line.body, engine.default_sampling_overrides)
                check_model(request, [*served, engine.config.model])
                if request.stream:
                    raise OpenAIError("stream is not supported in a batch", "stream", code="unsupported")
                if request.use_beam_search:
                    raise OpenAIError("use_beam_search is not supported in run-batch yet: serve the model and send "
                                      "it there, or use LLM.beam_search", "use_beam_search", code="unsupported")
                prompts = make_prompts(request, engine.tokenizer, engine)
            except OpenAIError as err:
                errors.append(error_record(line.custom_id, err.code or err.type, err.message))
                continue
            jobs.append(_Job(line.custom_id, request, prompts))
        return jobs, errors
