"""`run-batch --data-parallel-size N`: a BatchRunner's remaining lines on Ray replicas
(forkserve/scaleout), each appending its records to its own part file, merged into the output in
input order at the end (batch_output.merge_parts; a rerun after a killed driver merges first)."""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from tqdm import tqdm

from forkserve.entrypoints.batch_output import ResultWriter, merge_parts, parts_directory, recover_output
from forkserve.entrypoints.batch_runner import BatchLine, BatchRunner, BatchSummary, answer_lines, validate_lines
from forkserve.scaleout.ray_replicas import ReplicaSet, decode_estimate
from forkserve.scaleout.work_queues import Unit

logger = logging.getLogger(__name__)


def read_lines(llm: Any, lines: list[BatchLine], served: list[str]) -> list[tuple[list[int], int]]:
    """On a replica, per batch line: its first prompt's tokens (the trie's key) and the rest of its
    estimated cost (other prompts' tokens, decode tokens); ([], 0) for a line that will be an error."""
    jobs, _ = validate_lines(lines, llm.engine, served)
    read = {job.custom_id: ([*job.prompts[0].token_ids],
                            sum(len(p.token_ids) for p in job.prompts[1:])
                            + len(job.prompts) * decode_estimate(job.request.params))
            for job in jobs}
    return [read.get(line.custom_id, ([], 0)) for line in lines]


def answer_on_replica(llm: Any, lines: list[BatchLine], part: str, served: list[str]) -> BatchSummary:
    """On a replica: run batch lines, appending each record to its part file as it finishes."""
    summary = BatchSummary(total=len(lines))
    writer = ResultWriter(part)
    try:
        with tqdm(disable=True) as bar:
            answer_lines(llm.engine, lines, writer, summary, bar, served)
    finally:
        writer.close()
    return summary


def run_batch_data_parallel(runner: BatchRunner, replicas: ReplicaSet, served: list[str],
                            use_tqdm: bool = True) -> BatchSummary:
    """Run a BatchRunner's remaining lines on the replicas; the output ends in input order, each custom_id once."""
    summary = BatchSummary(total=len(runner.lines), skipped=runner.skipped, rerun=runner.rerun)
    start = time.perf_counter()
    lines = runner.todo
    read = replicas.call_chunks(read_lines, lines, served)
    planned = replicas.plan([tokens for tokens, _ in read], [extra for _, extra in read])
    directory = parts_directory(runner.output_path)
    directory.mkdir(exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    parts = [str(directory / f"{run_id}-replica-{r}.jsonl") for r in range(replicas.size)]
    with tqdm(total=len(runner.lines), initial=runner.skipped, desc="run-batch", unit="req",
              disable=not use_tqdm, dynamic_ncols=True) as bar:
        def done(items: list[int], wave: BatchSummary) -> None:
            for name in ("succeeded", "failed", "prompt_tokens", "cached_tokens", "generated_tokens"):
                setattr(summary, name, getattr(summary, name) + getattr(wave, name))
            bar.update(len(items))

        def unfinished(replica: int, wave: list[Unit[int]]) -> list[Unit[int]]:
            recovered = recover_output(parts[replica])
            kept = [Unit([i for i in unit.items if lines[i].custom_id not in recovered.answered], unit.cost)
                    for unit in wave]
            finished = sum(len(unit.items) for unit in wave) - sum(len(unit.items) for unit in kept)
            failed = sum(1 for unit in wave for i in unit.items if lines[i].custom_id in recovered.failed)
            summary.succeeded += finished - failed
            summary.failed += failed
            bar.update(finished)
            return [unit for unit in kept if unit.items]

        replicas.drive(planned, lambda replica, items: replicas.actors[replica].call.remote(
            answer_on_replica, [lines[i] for i in items], parts[replica], served), done, unfinished)
    merge_parts(runner.output_path, [line.custom_id for line in runner.lines])
    summary.seconds = time.perf_counter() - start
    logger.info("%s", summary.describe(runner.output_path))
    return summary
