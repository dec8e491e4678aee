"""Engine faults (a step that raises) are contained: the server fails only the unfinished requests
with 500, resets its engine (or builds a new one) and keeps answering; run-batch isolates the
request that makes the engine fail by re-running halves, and answers every other line."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from forkserve import LLM, SamplingParams  # noqa: E402
from forkserve.config import EngineConfig  # noqa: E402
from forkserve.engine.engine import Engine  # noqa: E402
from forkserve.entrypoints.batch_runner import BatchRunner, EngineKeepsFailing  # noqa: E402
from forkserve.entrypoints.engine_loop import EngineLoop  # noqa: E402
from forkserve.entrypoints.server import build_app  # noqa: E402
from test_server import ServerThread  # noqa: E402

ENGINE = dict(device="cpu", dtype="float32", max_num_seqs=4, num_gpu_blocks_override=256)
BODY = {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


def faulty(engine: Engine) -> dict[str, int]:
    """Make engine.step raise while faults['left'] > 0 (a device error, as far as the loop can tell)."""
    real_step, faults = engine.step, {"left": 0}

    def step():
        if faults["left"]:
            faults["left"] -= 1
            raise RuntimeError("simulated device failure")
        return real_step()

    engine.step = step
    return faults


def test_server_fault_fails_only_unfinished_requests_and_recovers(model_dir) -> None:
    engine = Engine(EngineConfig.from_kwargs(model_dir, **ENGINE))
    faults = faulty(engine)
    loop = EngineLoop(engine)
    with ServerThread(build_app(loop, ["tiny"])) as server:
        url = f"{server.url}/v1/completions"
        before = httpx.post(url, json=BODY, timeout=30)
        assert before.status_code == 200
        faults["left"] = 1
        r = httpx.post(url, json=BODY, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_fault"
        assert "simulated device failure" in r.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        after = httpx.post(url, json=BODY, timeout=30)
        assert after.status_code == 200
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        faults["left"] = 1  # a streamed request gets the fault as an error event, then [DONE]
        streamed = httpx.post(url, json={**BODY, "stream": True}, timeout=30)
        events = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "engine_fault" and streamed.text.rstrip().endswith("[DONE]")
        assert metrics_of(server)["forkserve_engine_faults_total"] == 2
        assert loop.engine is engine and engine.pool.num_pages - engine.pool.num_free == \
            engine.tree.num_evictable_pages  # the aborted requests' pages came back (cache aside)
        assert httpx.post(url, json=BODY, timeout=30).status_code == 200


def metrics_of(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_server_builds_a_new_engine_when_the_reset_fails(model_dir) -> None:
    engine = Engine(EngineConfig.from_kwargs(model_dir, **ENGINE))
    faults = faulty(engine)

    def broken_abort(request_id: str) -> None:
        raise RuntimeError("state lost")

    engine.abort_request = broken_abort
    built: list[Engine] = []

    def rebuild() -> Engine:
        built.append(Engine(EngineConfig.from_kwargs(model_dir, **ENGINE)))
        return built[-1]

    loop = EngineLoop(engine, rebuild=rebuild)
    with ServerThread(build_app(loop, ["tiny"])) as server:
        url = f"{server.url}/v1/completions"
        faults["left"] = 1
        assert httpx.post(url, json=BODY, timeout=60).status_code == 500
        deadline = time.monotonic() + 60
        while (r := httpx.post(url, json=BODY, timeout=60)).status_code == 503:  # while the new engine loads
            assert r.json()["error"]["code"] == "engine_restarting" and time.monotonic() < deadline
            time.sleep(0.1)
        assert r.status_code == 200
        assert loop.engine is built[0] and loop.engine.scheduler.fair
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_server_without_an_engine_says_so_and_asks_to_exit(model_dir) -> None:
    engine = Engine(EngineConfig.from_kwargs(model_dir, **ENGINE))
    faults = faulty(engine)
    engine.abort_request = lambda request_id: (_ for _ in ()).throw(RuntimeError("state lost"))
    dead: list[bool] = []
    loop = EngineLoop(engine, on_dead=lambda: dead.append(True))
    with ServerThread(build_app(loop, ["tiny"])) as server:
        faults["left"] = 1
        assert httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=30).status_code == 500
        r = httpx.post(f"{server.url}/v1/completions", json=BODY, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    assert dead == [True]


def batch_line(custom_id: str, prompt: str) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": prompt, "max_tokens": 3, "temperature": 0}})


def test_batch_isolates_the_request_the_engine_fails_on(model_dir, tmp_path: Path) -> None:
    """The engine raises whenever one particular request is in it: bisection leaves that one alone
    with an engine_error record; the other 9 are answered once, as LLM answers them."""
    prompts = {f"r{i}": f"Numbers: {i}" for i in range(10)}
    prompts["r6"] = "POISON"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(batch_line(cid, p) for cid, p in prompts.items()) + "\n")
    engine = Engine(EngineConfig.from_kwargs(model_dir, **ENGINE))
    real_step = engine.step

    def step():
        if any(r.prompt == "POISON" for r in engine.requests.values()):
            raise RuntimeError("kernel failure on this request")
        return real_step()

    engine.step = step
    with BatchRunner(inp, out) as runner:
        summary = runner.run(engine, ["tiny"], use_tqdm=False)
    assert (summary.succeeded, summary.failed) == (9, 1)
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records) == 10 and len(out.read_text().splitlines()) == 10
    assert records["r6"]["error"]["code"] == "engine_error" and "kernel failure" in records["r6"]["error"]["message"]
    llm = LLM(model_dir, **ENGINE)
    for cid, prompt in prompts.items():
        if cid != "r6":
            expected = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
            assert records[cid]["response"]["body"]["choices"][0]["text"] == expected.outputs[0].text


def test_batch_stops_when_the_engine_fails_on_everything(model_dir, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(batch_line(f"r{i}", f"Numbers: {i}") for i in range(8)) + "\n")
    engine = Engine(EngineConfig.from_kwargs(model_dir, **ENGINE))
    faulty(engine)["left"] = 10 ** 9
    with BatchRunner(inp, out) as runner, pytest.raises(EngineKeepsFailing, match="not the requests"):
        runner.run(engine, ["tiny"], use_tqdm=False)
    assert len(out.read_text().splitlines()) == 3  # the three isolated failures, then it stopped
