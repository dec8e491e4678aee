"""`forkserve run-batch`: an OpenAI Batch API input file in, one result line per request out.

Input lines: {"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body": {...}}. Output lines, in the order requests finish:
{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id", "body"},
"error": null, "fingerprint"}, or "response": null with "error": {"code", "message", "param"} for
a request that could not run (bad JSON, unknown url, invalid body: `param` names the body field).
A line without a usable custom_id is keyed "malformed-<hash of its bytes>", so that deleting or
adding other lines does not re-key it.

Every valid request of the file goes to the engine as one batch before the first step
(`Engine.add_requests`), so the planner sees the whole file: each prefix its prompts share is
prefilled once. Should a step fail, the engine is reset and the unfinished requests run again in
halves until the request that fails alone is found: it gets an error record, the others their
answers.

One runner per output file: `<output>.lock` is held (fcntl.flock) for the whole run and names
the holder's pid; a second runner is refused. The output directory is checked writable, with
room to spare, before the model loads.

Resuming: each result line is appended with one write and fsynced when its request finishes.
A rerun with the same output file reads it first, cuts a torn last line (a kill in mid-write)
back to the last newline, and runs only the custom_ids not yet answered. Each record carries the
`fingerprint` of its request (sha256 of the canonical JSON of method, url and body): a request
whose line changed since is run again, and its new record supersedes the old one. Superseded
records are dropped when the run ends, by rewriting the file atomically (temporary file, fsync,
rename), so the finished file holds each custom_id exactly once; until then (a kill before the
end) the later record of a custom_id is the one that counts, and the next run compacts.
A line whose stored result is an error counts as answered; `retry_failed` takes those results
out of the file (rewritten whole, then renamed over it) and runs their lines again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from forkserve.entrypoints.batch_output import (OutputLock, OutputUnusable, ResultWriter, _unwritable, compact_output,
                                                drop_results, merge_parts, recover_output)
from forkserve.entrypoints.openai_protocol import (URLS, OpenAIError, OpenAIRequest, check_model, make_prompts,
                                                   new_id, parse_json, parse_request)
from forkserve.entrypoints.openai_responses import response_body
from forkserve.entrypoints.recovery import reset_engine
from forkserve.engine.engine import PromptInput
from forkserve.engine.summary import batch_summary, describe
from forkserve.outputs import RequestOutput
from forkserve.sampling_params import shown

logger = logging.getLogger(__name__)


# Room the output directory must have before the model loads: a margin, a few KiB per request to
# run, and a copy of the existing output (superseded records are dropped by rewriting it).
MIN_FREE_BYTES = 16 << 20
FREE_BYTES_PER_REQUEST = 8 << 10
# Requests that fail alone, one after another with nothing answered between them, before the run
# stops: past that the engine, not the requests, is at fault.
MAX_ISOLATED_FAULTS_IN_A_ROW = 3
MALFORMED = "malformed-"  # key prefix of lines without a usable custom_id


class DuplicateCustomIds(ValueError):
    """The input names some custom_id more than once: refused before any work."""


class EngineKeepsFailing(RuntimeError):
    """Requests fail alone one after another: the engine, not the requests, is at fault."""


@dataclass
class BatchLine:
    """One non-blank input line: its key and fingerprint, and either the request or why it cannot run."""

    line_no: int
    custom_id: str  # "malformed-<hash>" when the line has no usable custom_id
    fingerprint: str
    url: str | None = None
    body: Any = None
    error: tuple[str, str, str | None] | None = None  # (code, message, param)


@dataclass
class BatchSummary:
    total: int = 0  # request lines in the input
    skipped: int = 0  # already answered in the output file before this run
    rerun: int = 0  # answered before, but the request changed since: run again
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
                f"{self.skipped} already in {output}, {self.rerun} re-run (changed since); {self.prompt_tokens} prompt tokens "
                f"({self.prefix_reuse:.1%} from the prefix cache), {self.generated_tokens} generated tokens "
                f"in {self.seconds:.1f} s ({rate:.1f} tokens/s)")


def read_batch_input(path: str | Path) -> list[BatchLine]:
    """Parse every line; a line that cannot be a request becomes a BatchLine with an error.

    Raises DuplicateCustomIds when a custom_id appears on more than one line.
    """
    lines: list[BatchLine] = []
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if line_no == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark some editors write
                if raw.strip():
                    lines.append(_parse_line(line_no, raw.strip()))
    except OSError as err:
        raise ValueError(f"cannot read the input file {path}: {err.strerror or err}") from None
    seen: dict[str, list[int]] = {}
    for line in lines:
        lines_of_key = seen.setdefault(line.custom_id, [])
        lines_of_key.append(line.line_no)
        if line.custom_id.startswith(MALFORMED) and len(lines_of_key) > 1:
            line.custom_id += f"-{len(lines_of_key)}"  # identical malformed lines: 2nd, 3rd... in file order
    duplicates = {cid: nums for cid, nums in seen.items() if len(nums) > 1 and not cid.startswith(MALFORMED)}
    if duplicates:
        listed = "; ".join(f"{shown(cid)} on lines {', '.join(map(str, nums))}" for cid, nums in duplicates.items())
        raise DuplicateCustomIds(f"{path}: duplicate custom_id(s), every request needs its own: {listed}")
    return lines


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def request_fingerprint(method: Any, url: Any, body: Any) -> str | None:
    """sha256 of the request's canonical JSON (sorted keys, no spaces, ASCII); None if it cannot be
    written back (nesting Python cannot recurse through)."""
    try:
        canonical = json.dumps({"method": method, "url": url, "body": body}, sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return None
    return _digest(canonical.encode("ascii"))


def _parse_line(line_no: int, raw: bytes) -> BatchLine:
    """`raw` is the line without surrounding whitespace; a line that is not a usable request is
    keyed by its bytes' hash."""
    raw_digest = _digest(raw)
    key = f"{MALFORMED}{raw_digest[:16]}"
    try:
        obj = parse_json(raw, f"line {line_no}")
    except OpenAIError as err:
        return BatchLine(line_no, key, raw_digest, error=("invalid_json", err.message, None))
    if not isinstance(obj, dict):
        return BatchLine(line_no, key, raw_digest,
                         error=("invalid_request", f"line {line_no} must be a JSON object", None))
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or custom_id.startswith(MALFORMED):
        return BatchLine(line_no, key, raw_digest, error=(
            "invalid_request", f"line {line_no}: custom_id must be a non-empty string (not starting "
                               f"{MALFORMED!r}), got {shown(custom_id)}", "custom_id"))
    method = obj.get("method", "POST")
    fingerprint = request_fingerprint(method, obj.get("url"), obj.get("body")) or raw_digest
    line = BatchLine(line_no, custom_id, fingerprint, obj.get("url"), obj.get("body"))
    if method != "POST":
        line.error = ("invalid_method", f"method must be POST, got {shown(method)}", "method")
    elif not isinstance(line.url, str) or line.url not in URLS:
        line.error = ("invalid_url", f"unknown url {shown(line.url)}: expected one of {', '.join(URLS)}", "url")
    elif not isinstance(line.body, dict):
        line.error = ("invalid_request", "body must be a JSON object", "body")
    return line


def success_record(custom_id: str, body: dict[str, Any], fingerprint: str | None = None) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
            "error": None, "fingerprint": fingerprint}


def error_record(custom_id: str, code: str, message: str, param: str | None = None,
                 fingerprint: str | None = None) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "param": param}, "fingerprint": fingerprint}


@dataclass
class _Job:
    custom_id: str
    fingerprint: str
    request: OpenAIRequest
    prompts: list[PromptInput]
    outputs: dict[int, RequestOutput] = field(default_factory=dict)
    answered: bool = False  # its record is written


class BatchRunner:
    """Owns the output file (its lock), reads the input (refusing duplicates) and the output so far;
    `run` does the rest, `close` lets the output go.

    Construction does no model work, so a bad input file, an output another runner holds, or an
    output directory that is read-only or full fails before the engine is built; `remaining == 0`
    means there is nothing left to run.
    """

    def __init__(self, input_path: str | Path, output_path: str | Path, retry_failed: bool = False) -> None:
        self.input_path, self.output_path = Path(input_path), Path(output_path)
        if self.output_path.exists() and self.output_path.resolve() == self.input_path.resolve():
            raise ValueError(f"the output file is the input file ({input_path}): give another -o")
        self._check_writable()
        self.lock = OutputLock(self.output_path)
        try:
            self.lines = read_batch_input(self.input_path)
            merge_parts(self.output_path, [line.custom_id for line in self.lines])  # a data-parallel run's leftovers
            recovered = recover_output(self.output_path)
            answered = recovered.answered
            self._superseded = recovered.num_records > len(answered)  # an earlier run ended before compacting
            failed = recovered.failed & {line.custom_id for line in self.lines}
            self.retried = 0  # failed results taken out to run again (retry_failed)
            if retry_failed and failed:
                drop_results(self.output_path, failed)
                for custom_id in failed:
                    del answered[custom_id]
                self.retried, failed = len(failed), set()
            self.failed_before = len(failed)  # answered lines whose stored result is an error
            self.todo = [line for line in self.lines if line.custom_id not in answered
                         or answered[line.custom_id] not in (None, line.fingerprint)]
            self.rerun = sum(1 for line in self.todo if line.custom_id in answered)
            self.skipped = len(self.lines) - len(self.todo)
            stray = answered.keys() - {line.custom_id for line in self.lines}
            if stray:
                logger.warning("%s holds %d custom_id(s) that are not in %s", self.output_path, len(stray),
                               self.input_path)
            self._check_free_space()
        except BaseException:
            self.lock.release()
            raise

    def __enter__(self) -> "BatchRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.lock.release()

    @property
    def remaining(self) -> int:
        return len(self.todo)

    def any_succeeded(self) -> bool:
        """Does the output file hold a successful result for some line of the input?"""
        recovered = recover_output(self.output_path)
        return bool((recovered.answered.keys() - recovered.failed) & {line.custom_id for line in self.lines})

    def _check_writable(self) -> None:
        directory = self.output_path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputUnusable(f"cannot create the output directory {directory}: {err.strerror or err}") from None
        if self.output_path.is_dir():
            raise OutputUnusable(f"the output {self.output_path} is a directory: give a file")
        for path in (directory, self.output_path):
            if path.exists() and not os.access(path, os.W_OK):
                raise OutputUnusable(f"cannot write results to {self.output_path}: {path} is not writable")

    def _check_free_space(self) -> None:
        directory = self.output_path.parent
        existing = self.output_path.stat().st_size if self.output_path.exists() else 0
        needed = MIN_FREE_BYTES + FREE_BYTES_PER_REQUEST * len(self.todo) + existing
        free = shutil.disk_usage(directory).free
        if free < needed:
            raise OutputUnusable(f"{directory} has {free / 2**20:.1f} MiB free; the results of {len(self.todo)} "
                                 f"requests need about {needed / 2**20:.1f} MiB: free some space first")

    def compact(self) -> None:
        """Drop records superseded by a re-run (see the module's docstring); only reads the output
        when some may be there."""
        if not (self.rerun or self._superseded):
            return
        try:
            dropped = compact_output(self.output_path)
        except OSError as err:
            raise _unwritable(self.output_path, err) from None
        if dropped:
            logger.info("%s: dropped %d superseded record(s)", self.output_path, dropped)

    def run(self, engine: Any, served_model_names: list[str], use_tqdm: bool = True) -> BatchSummary:
        """Run every remaining request on `engine` (a `forkserve.engine.engine.Engine`)."""
        summary = BatchSummary(total=len(self.lines), skipped=self.skipped, rerun=self.rerun)
        start = time.perf_counter()
        before = engine.stats()
        writer = ResultWriter(self.output_path)
        try:
            with tqdm(total=len(self.lines), initial=self.skipped, desc="run-batch", unit="req",
                      disable=not use_tqdm, dynamic_ncols=True) as bar:
                answer_lines(engine, self.todo, writer, summary, bar, served_model_names)
        finally:
            writer.close()
        self.compact()
        summary.seconds = time.perf_counter() - start
        logger.info("%s", summary.describe(self.output_path))
        logger.info("%s", describe(batch_summary(before, engine.stats(), engine.pages_in_use_series())))
        return summary


def validate_lines(lines: list[BatchLine], engine: Any, served: list[str]) -> tuple[list[_Job], list[dict[str, Any]]]:
    """Jobs for the valid lines, error records for the others."""
    jobs, errors = [], []
    for line in lines:
        if line.error is not None:
            errors.append(error_record(line.custom_id, *line.error, fingerprint=line.fingerprint))
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
            errors.append(error_record(line.custom_id, err.code or err.type, err.message, err.param,
                                       line.fingerprint))
            continue
        except Exception as err:  # a body the checks did not foresee: still this line's error alone
            logger.exception("%s: the request failed validation unexpectedly", line.custom_id)
            errors.append(error_record(line.custom_id, "invalid_request", f"the request could not be read: "
                                       f"{type(err).__name__}: {shown(str(err))}", None, line.fingerprint))
            continue
        jobs.append(_Job(line.custom_id, line.fingerprint, request, prompts))
    return jobs, errors


def answer_lines(engine: Any, lines: list[BatchLine], writer: ResultWriter, summary: BatchSummary, bar: tqdm,
                 served: list[str]) -> None:
    """Validate `lines` and run the valid ones on `engine` as one batch, appending every line's
    record to `writer` as it is known (a data-parallel replica runs its share through this too)."""
    run = _Run(engine, writer, summary, bar, time.perf_counter(), served)
    jobs, errors = validate_lines(lines, engine, served)
    run.write(errors, failed=len(errors))
    run.all(jobs)


class _Run:
    """One run's jobs through the engine: all of them as one batch, and after a fault, halves.

    A step that raises fails no line by itself: the engine is reset, the unfinished jobs are split
    in two and each half runs as a batch again, so a job that makes the engine fail ends up alone
    and gets an error record while every other job is answered.
    """

    def __init__(self, engine: Any, writer: ResultWriter, summary: BatchSummary, bar: tqdm, start: float,
                 served: list[str]) -> None:
        self.engine, self.writer, self.summary, self.bar, self.start, self.served = \
            engine, writer, summary, bar, start, served
        self.attempt = 0
        self.isolated_faults_in_a_row = 0

    def write(self, records: list[dict[str, Any]], succeeded: int = 0, failed: int = 0) -> None:
        if not records:
            return
        self.writer.write(records)
        self.summary.succeeded += succeeded
        self.summary.failed += failed
        if succeeded:
            self.isolated_faults_in_a_row = 0
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.summary.generated_tokens / max(elapsed, 1e-9):.0f} tok/s, "
                                 f"prefix reuse {self.summary.prefix_reuse:.0%}", refresh=False)
        self.bar.update(len(records))

    def all(self, jobs: list[_Job]) -> None:
        groups = [jobs] if jobs else []
        while groups:
            group = groups.pop()
            try:
                self.group(group)
            except OutputUnusable:
                raise
            except Exception as err:  # an engine fault, part-way through a step
                logger.exception("the engine failed running %d request(s); it is reset and they run again",
                                 len(group))
                reset_engine(self.engine)
                unfinished = [job for job in group if not job.answered]
                for job in unfinished:
                    job.outputs.clear()
                if len(unfinished) == 1:
                    self.isolate(unfinished[0], err)
                elif unfinished:
                    half = len(unfinished) // 2
                    groups += [unfinished[half:], unfinished[:half]]  # the first half runs next

    def isolate(self, job: _Job, err: Exception) -> None:
        """The engine failed running this job alone: its error record."""
        self.write([error_record(job.custom_id, "engine_error", f"the engine failed running this request: "
                                 f"{type(err).__name__}: {shown(str(err))}", None, job.fingerprint)], failed=1)
        job.answered = True
        self.isolated_faults_in_a_row += 1
        if self.isolated_faults_in_a_row >= MAX_ISOLATED_FAULTS_IN_A_ROW:
            raise EngineKeepsFailing(f"the engine failed on {self.isolated_faults_in_a_row} requests in a row, "
                                     f"each alone (the last: {type(err).__name__}: {err}): it, not the requests, "
                                     "is at fault; results so far are kept, rerun to resume")

    def group(self, jobs: list[_Job]) -> None:
        """Run jobs as one batch, writing each one's record as it finishes."""
        engine, summary = self.engine, self.summary
        self.attempt += 1
        owners: dict[str, tuple[_Job, int]] = {}
        batch = []
        for j, job in enumerate(jobs):
            for p, prompt in enumerate(job.prompts):
                request_id = f"{self.attempt}.{j}.{p}"
                batch.append((request_id, prompt, job.request.params))
                owners[request_id] = (job, p)
        engine.add_requests(batch)
        while engine.has_unfinished_requests():
            records = []
            for output in engine.step():
                job, p = owners.pop(output.request_id)
                job.outputs[p] = output
                summary.generated_tokens += sum(len(c.token_ids) for c in output.outputs)
                summary.prompt_tokens += len(output.prompt_token_ids)
                summary.cached_tokens += output.num_cached_tokens
                if len(job.outputs) == len(job.prompts):
                    outputs = [job.outputs[i] for i in range(len(job.prompts))]
                    model = job.request.model or self.served[0]
                    body = response_body(job.request, new_id(job.request.kind), model, outputs)
                    records.append(success_record(job.custom_id, body, job.fingerprint))
                    job.answered = True
            self.write(records, succeeded=len(records))
