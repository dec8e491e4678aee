"""`forkserve serve` end to end on CPU: a real uvicorn server on 127.0.0.1, the official openai
client, raw httpx for the error paths, a disconnect, and a burst of concurrent requests."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from forkserve import LLM, SamplingParams  # noqa: E402
from forkserve.config import EngineConfig  # noqa: E402
from forkserve.engine.engine import Engine  # noqa: E402
from forkserve.entrypoints.engine_loop import EngineLoop  # noqa: E402
from forkserve.entrypoints.server import build_app  # noqa: E402

KEY = "test-key"
NAME = "tiny"
MAX_WAITING = 4
MAX_BODY = 64 * 1024
ENGINE = dict(device="cpu", dtype="float32", max_num_seqs=4)
AUTH = {"Authorization": f"Bearer {KEY}"}
SYSTEM = "You are a helpful assistant. Answer briefly and clearly."


class ServerThread:
    """uvicorn on a socket bound here (port 0: a free port), run in a background thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def served(model_dir):
    loop = EngineLoop(Engine(EngineConfig.from_kwargs(model_dir, **ENGINE)))
    app = build_app(loop, [NAME], api_key=KEY, max_waiting=MAX_WAITING, max_request_bytes=MAX_BODY)
    with ServerThread(app) as server:
        server.loop = loop
        yield server


@pytest.fixture(scope="module")
def llm(model_dir) -> LLM:
    return LLM(model_dir, **ENGINE)


@pytest.fixture(scope="module")
def client(served) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def metrics(served) -> dict[str, float]:
    text = httpx.get(f"{served.url}/metrics", headers=AUTH, timeout=10).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and not line.startswith("#")}


def greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)


# ------------------------------------------------------------------------------ openai client
def test_completions_match_llm(client, llm) -> None:
    prompt = "The quick brown fox"
    expected = llm.generate(prompt, greedy(12), use_tqdm=False)[0]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == NAME
    assert out.choices[0].text == expected.outputs[0].text
    assert out.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)

    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.outputs[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)

    # A stop string met mid-output: streamed text holds back its start, and both cut there.
    full = expected.outputs[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2)
                if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    cut = llm.generate(prompt, greedy(12, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                         stream=True)
    assert plain.choices[0].text == cut.text
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_chat_matches_llm(client, llm) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why is the sky blue?"}]
    expected = llm.chat(messages, greedy(10), use_tqdm=False)[0].outputs[0]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # Requests arriving over time share the prefix tree: the conversation's pages are cached now.
    again = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.choices[0].message.content == expected.text


def test_n_seed_and_logprobs(client) -> None:
    out = client.completions.create(model=NAME, prompt=["Once upon a time", "Numbers: one"], n=2, max_tokens=6,
                                    temperature=0.8, seed=7, logprobs=2)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    for choice in out.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 6
        assert all(1 <= len(top) <= 3 for top in choice.logprobs.top_logprobs)
    again = client.completions.create(model=NAME, prompt=["Once upon a time", "Numbers: one"], n=2, max_tokens=6,
                                      temperature=0.8, seed=7, logprobs=2)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    streamed = client.completions.create(model=NAME, prompt=["Once upon a time", "Numbers: one"], n=2, max_tokens=6,
                                         temperature=0.8, seed=7, stream=True)
    texts, finishes = [""] * 4, [None] * 4
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
        finishes[chunk.choices[0].index] = chunk.choices[0].finish_reason or finishes[chunk.choices[0].index]
    assert texts == [c.text for c in out.choices] and finishes == ["length"] * 4

    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    streamed = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                              temperature=0, logprobs=True, top_logprobs=3, stream=True)
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_models_and_auth(served, client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics")):
            r = httpx.request(method, f"{served.url}{path}", headers=headers, json={"prompt": "x"}, timeout=10)
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    wrong = openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=NAME, prompt="x", max_tokens=1)


def test_metrics(served) -> None:
    """Every gauge and counter the issue names, with HELP and TYPE, moving as requests run."""
    before = metrics(served)
    body = {"prompt": f"{SYSTEM} {SYSTEM} Question: what does paging do?", "max_tokens": 6, "ignore_eos": True}
    for _ in range(2):  # the second finds the first's prompt pages cached
        assert httpx.post(f"{served.url}/v1/completions", headers=AUTH, json=body, timeout=30).status_code == 200
    text = httpx.get(f"{served.url}/metrics", headers=AUTH, timeout=10).text
    after = metrics(served)
    for name in ("requests_running", "requests_waiting", "generation_tokens_per_second", "prefix_cache_hit_rate",
                 "kv_pages_in_use", "kv_pages_active", "kv_pages_total", "generation_tokens_total",
                 "requests_aborted_total", "requests_rejected_total"):
        assert f"# TYPE forkserve_{name} " in text and f"# HELP forkserve_{name} " in text, name
    assert after["forkserve_requests_finished_total"] - before["forkserve_requests_finished_total"] == 2
    assert after["forkserve_generation_tokens_total"] - before["forkserve_generation_tokens_total"] == 12
    assert after["forkserve_generation_tokens_per_second"] > 0  # tokens were made in the last 10 seconds
    hits = after["forkserve_prefix_cache_hit_tokens_total"] - before["forkserve_prefix_cache_hit_tokens_total"]
    assert hits >= 16
    assert after["forkserve_prefix_cache_hit_rate"] == pytest.approx(
        after["forkserve_prefix_cache_hit_tokens_total"] / after["forkserve_prompt_tokens_total"], abs=1e-5)
    assert after["forkserve_requests_running"] == after["forkserve_requests_waiting"] == 0
    assert 0 < after["forkserve_kv_pages_in_use"] <= after["forkserve_kv_pages_total"]


def test_serve_defaults_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    from forkserve.cli import build_parser

    monkeypatch.delenv("FORKSERVE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("path,body,param,status", [
    ("/v1/completions", b'{"prompt": "x", ', None, 400),
    ("/v1/completions", b'["prompt"]', None, 400),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", 400),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs", 400),
    ("/v1/completions", {"prompt": "x", "bogus": 1}, "bogus", 400),
    ("/v1/completions", {"prompt": 5}, "prompt", 400),
    ("/v1/completions", {"max_tokens": 3}, "prompt", 400),
    ("/v1/completions", {"prompt": [5] * 5000}, "prompt", 400),
    ("/v1/completions", {"prompt": "x", "model": "other"}, "model", 404),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
     "max_completion_tokens", 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", 400),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", 400),
    ("/v1/chat/completions", {"messages": []}, "messages", 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 5000}]}, "messages", 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1.5}, "n", 400),
])
def test_bad_requests_name_the_field(served, path, body, param, status) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{served.url}{path}", content=content, headers={**AUTH, "Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    if len(content) > 10000:  # the too-long prompts
        assert "max_model_len" in error["message"] and error["code"] == "context_length_exceeded"


def test_too_long_prompt_and_big_body(served, client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=[7] * 5000, max_tokens=1)
    assert err.value.param == "prompt" and "max_model_len" in err.value.message
    r = httpx.post(f"{served.url}/v1/completions", headers=AUTH, timeout=30,
                   json={"prompt": "x" * (MAX_BODY + 10), "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------------- disconnect, load
def test_disconnect_aborts_and_frees_pages(served) -> None:
    engine = served.loop.engine
    prompt = "Once upon a time, in a quiet village by the sea, there lived an old fisherman"
    body = {"prompt": prompt, "max_tokens": 1}
    assert httpx.post(f"{served.url}/v1/completions", headers=AUTH, json=body, timeout=30).status_code == 200
    before_in_use = engine.pool.num_pages - engine.pool.num_free  # the prompt's pages are cached now
    before = metrics(served)
    long = {"prompt": prompt, "max_tokens": 3500, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{served.url}/v1/completions", headers=AUTH, json=long) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # held: a dropped iterator closes the connection
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break
            during = metrics(served)
            assert during["forkserve_requests_running"] == 1 and during["forkserve_kv_pages_active"] > 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = metrics(served)
        if after["forkserve_kv_pages_active"] == 0 and after["forkserve_requests_running"] == 0:
            break
        time.sleep(0.05)
    assert after["forkserve_kv_pages_active"] == 0 and after["forkserve_requests_running"] == 0
    assert after["forkserve_requests_aborted_total"] == before["forkserve_requests_aborted_total"] + 1
    assert after["forkserve_generation_tokens_total"] - before["forkserve_generation_tokens_total"] < 3000
    assert after["forkserve_kv_pages_in_use"] == before_in_use == engine.pool.num_pages - engine.pool.num_free


def test_non_streaming_disconnect_aborts(served) -> None:
    before = metrics(served)
    long = {"prompt": "The weather today is mild", "max_tokens": 3500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", headers=AUTH, json=long, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = metrics(served)
        if after["forkserve_requests_aborted_total"] > before["forkserve_requests_aborted_total"]:
            break
        time.sleep(0.05)
    assert after["forkserve_requests_aborted_total"] == before["forkserve_requests_aborted_total"] + 1
    assert after["forkserve_kv_pages_active"] == 0 and after["forkserve_requests_running"] == 0


def test_bounded_load(served) -> None:
    async def one(http: httpx.AsyncClient, i: int) -> int:
        body = {"prompt": f"Question: what is {i} plus one? Answer:", "max_tokens": 24, "ignore_eos": True,
                "stream": i % 2 == 0}
        r = await http.post(f"{served.url}/v1/completions", headers=AUTH, json=body)
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and f"--max-waiting, is {MAX_WAITING}" in error["message"]
        elif r.status_code == 200 and body["stream"]:
            assert r.text.rstrip().endswith("data: [DONE]")
        elif r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 24
        return r.status_code

    async def burst() -> list[int]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    codes = asyncio.run(asyncio.wait_for(burst(), timeout=90))
    assert set(codes) <= {200, 429}
    assert codes.count(200) >= MAX_WAITING and codes.count(429) > 0
    assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
    after = metrics(served)
    assert after["forkserve_requests_waiting"] == 0 and after["forkserve_kv_pages_active"] == 0
    assert after["forkserve_requests_rejected_total"] >= codes.count(429)
    ok = httpx.post(f"{served.url}/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_arrivals_wait_longest_cached_prefix_first(model_dir) -> None:
    """One running slot, held by a long stream; a fresh prompt arrives, then one whose prefix is
    cached. When the slot frees, the cached one goes first (FIFO would run the fresh one first)."""
    engine = Engine(EngineConfig.from_kwargs(model_dir, **{**ENGINE, "max_num_seqs": 1}, num_gpu_blocks_override=512))
    loop = EngineLoop(engine)
    cached = f"{SYSTEM} {SYSTEM} Question:"
    finished: list[str] = []

    async def scenario(url: str) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            async def one(name: str, prompt: str) -> None:
                r = await http.post(url, json={"prompt": prompt, "max_tokens": 4, "ignore_eos": True})
                assert r.status_code == 200
                finished.append(name)

            await one("warm-up", f"{cached} what is paging?")
            hold = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
            async with http.stream("POST", url, json=hold) as holding:
                lines = holding.aiter_lines()  # held: a dropped iterator closes the connection
                async for line in lines:
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                        break  # it runs, in the only slot
                tasks = [asyncio.create_task(one("fresh", "The weather today is mild"))]
                while loop.num_waiting < 1:
                    await asyncio.sleep(0.01)
                tasks.append(asyncio.create_task(one("cached", f"{cached} what is a tree?")))
                while loop.num_waiting < 2:
                    await asyncio.sleep(0.01)
            await asyncio.gather(*tasks)  # leaving the stream aborted the holder

    with ServerThread(build_app(loop, [NAME])) as server:
        asyncio.run(asyncio.wait_for(scenario(f"{server.url}/v1/completions"), timeout=60))
    assert finished == ["warm-up", "cached", "fresh"]


# ------------------------------------------------------------------------------------ CLI
def test_serve_command(model_dir, tmp_path: Path) -> None:
    """`python -m forkserve serve` starts, guards with the key, and stops on SIGINT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, FORKSERVE_API_KEY="env-key")
    proc = subprocess.Popen([sys.executable, "-m", "forkserve", "serve", "--model", model_dir, "--device", "cpu",
                             "--port", str(port), "--served-model-name", "a", "--served-model-name", "b"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/v1/models", timeout=5).status_code == 401
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer env-key"}, timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["a", "b"]
        r = httpx.post(f"{base}/v1/completions", headers={"Authorization": "Bearer env-key"}, timeout=30,
                       json={"model": "b", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "b"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
