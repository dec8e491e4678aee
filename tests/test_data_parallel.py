"""Data parallelism on a local Ray (2 replicas of a tiny model): outputs equal to one engine with
each shared prefix computed once in the cluster; run-batch exactly once in input order through a
replica killed mid-run and a driver killed with SIGKILL; the Ray Data entry point."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from forkserve import LLM, SamplingParams  # noqa: E402
from forkserve.entrypoints.batch_output import parts_directory  # noqa: E402
from forkserve.entrypoints.batch_runner import BatchRunner  # noqa: E402
from forkserve.scaleout import replica_set  # noqa: E402
from forkserve.scaleout.partition import prefix_layout  # noqa: E402
from forkserve.entrypoints.batch_data_parallel import run_batch_data_parallel  # noqa: E402

PAGE = 16
KWARGS = dict(device="cpu", dtype="float32", block_size=PAGE, num_gpu_blocks_override=256, min_shared_prefix_len=16)
FLAGS = ["--device", "cpu", "--dtype", "float32", "--block-size", str(PAGE), "--num-gpu-blocks-override", "256"]
SYSTEMS = ["You are a careful assistant who answers in one short sentence. " * 3,
           "Translate the following words into French, one per line please. " * 2]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


def prompts(count: int) -> list[str]:
    return [f"{SYSTEMS[i % 2]} Item {i}:" if i % 3 else f"A lonely prompt {i} " * 3 for i in range(count)]


def batch_file(path: Path, count: int, max_tokens: int) -> list[str]:
    ids = [f"r{i}" for i in range(count)]
    path.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                                        "body": {"model": "tiny", "prompt": p, "max_tokens": max_tokens,
                                                 "temperature": 0, "ignore_eos": True}}) + "\n"
                            for cid, p in zip(ids, prompts(count))))
    return ids


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_equals_one_engine_and_prefills_each_prefix_once(ray_cluster, model_dir: str) -> None:
    batch = prompts(18)
    params = SamplingParams(max_tokens=6, temperature=0)
    llm = LLM(model_dir, data_parallel_size=2, **KWARGS)
    try:
        outputs = llm.generate(batch, params, use_tqdm=False)
        computed = sum(s["prefill_tokens_computed"] for s in llm.data_parallel.replicas.stats())
        with pytest.raises(ValueError, match="request 5"):  # validated on the replicas before any work
            llm.generate([*batch[:5], ""], params, use_tqdm=False)
    finally:
        llm.data_parallel.replicas.shutdown()
    one = LLM(model_dir, **KWARGS)
    expected = one.generate(batch, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [e.outputs[0].token_ids for e in expected]
    assert [o.request_id for o in outputs] == [str(i) for i in range(len(batch))]
    ids = [one.get_tokenizer()(p).input_ids for p in batch]
    unique = int(prefix_layout(ids, PAGE, 16).unique_tokens.sum())  # the batch's trie, as pages can share it
    assert computed <= 1.05 * unique
    assert one.engine.stats()["prefill_tokens_computed"] <= 1.05 * unique


def test_run_batch_in_input_order_through_a_lost_replica(ray_cluster, model_dir: str, tmp_path: Path,
                                                         caplog, monkeypatch) -> None:
    from forkserve.scaleout import ray_replicas

    monkeypatch.setattr(ray_replicas, "WAVE_FRACTION", 0.01)  # one unit per wave: replica 0 still has work when killed
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = batch_file(inp, 36, max_tokens=24)
    replicas = replica_set(LLM, model_dir, 2, KWARGS)
    runner = BatchRunner(inp, out)
    errors = []

    def run() -> None:
        try:
            run_batch_data_parallel(runner, replicas, ["tiny"], use_tqdm=False)
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    with caplog.at_level(logging.WARNING, logger="forkserve.scaleout.ray_replicas"):
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        killed = False
        while thread.is_alive() and time.monotonic() < deadline and not killed:
            for part in parts_directory(out).glob("*-replica-0.jsonl"):
                if part.read_bytes().count(b"\n") >= 1:
                    ray.kill(replicas.actors[0])
                    killed = True
            time.sleep(0.005)
        thread.join(120)
    runner.close()
    replicas.shutdown()
    assert killed and not errors, errors
    assert "replica 0 is lost" in caplog.text
    got = records(out)
    assert [r["custom_id"] for r in got] == ids  # every custom_id once, in input order
    assert all(r["response"]["status_code"] == 200 for r in got)
    assert not parts_directory(out).exists()
    usage = [r["response"]["body"]["usage"] for r in got]
    assert sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage) > 0


def test_kill_9_of_the_driver_then_rerun(ray_cluster, model_dir: str, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = batch_file(inp, 30, max_tokens=32)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "forkserve", "run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir,
               "--served-model-name", "tiny", "--no-progress", "--data-parallel-size", "2", *FLAGS]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    done = 0
    while proc.poll() is None and time.monotonic() < deadline and done < 3:
        done = sum(p.read_bytes().count(b"\n") for p in parts_directory(out).glob("*.jsonl")) \
            if parts_directory(out).is_dir() else 0
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 3 <= done < len(ids), (done, proc.stderr.read()[-2000:])
    replicas = replica_set(LLM, model_dir, 2, KWARGS)
    try:
        with BatchRunner(inp, out) as runner:  # merges the killed run's parts first
            assert runner.skipped >= 3 and runner.remaining == len(ids) - runner.skipped
            summary = run_batch_data_parallel(runner, replicas, ["tiny"], use_tqdm=False)
    finally:
        replicas.shutdown()
    assert summary.succeeded == len(ids) - runner.skipped
    assert [r["custom_id"] for r in records(out)] == ids


def test_ray_data_processor(ray_cluster, model_dir: str) -> None:
    from forkserve.entrypoints.ray_data import ForkserveEngineProcessorConfig, build_llm_processor

    batch = prompts(8)
    config = ForkserveEngineProcessorConfig(model_source=model_dir, engine_kwargs=KWARGS, concurrency=2,
                                            sampling_params={"max_tokens": 5, "temperature": 0})
    processor = build_llm_processor(config, preprocess=lambda row: {"prompt": row["text"], "key": row["key"]},
                                    postprocess=lambda row: {"key": row["key"], "answer": row["generated_text"],
                                                             "cached": row["num_cached_tokens"]})
    rows = processor(ray.data.from_items([{"text": p, "key": i} for i, p in enumerate(batch)])).take_all()
    expected = LLM(model_dir, **KWARGS).generate(batch, SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)
    assert sorted((r["key"], r["answer"]) for r in rows) == [(i, e.outputs[0].text) for i, e in enumerate(expected)]
    assert np.sum([r["cached"] for r in rows]) > 0
