"""Fuzzing request bodies and batch lines (issue 24) with hypothesis: wrong types everywhere, huge,
negative and non-finite numbers, lone surrogates and NUL bytes, deep nesting, unknown fields,
garbage bytes and content types. Against the Python API (the protocol layer and SamplingParams),
a loopback server and run-batch, asserting: nothing but a 4xx / an error record for what is
refused, no 5xx, no engine fault, and every valid request or line answered exactly once."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from forkserve.config import EngineConfig
from forkserve.engine.engine import Engine
from forkserve.entrypoints.batch_runner import BatchRunner
from forkserve.entrypoints.openai_protocol import CHAT, COMPLETIONS, OpenAIError, make_prompts, parse_request
from forkserve.sampling_params import FLOAT32_MAX, INT64_MAX, INT64_MIN, SamplingParams

ENGINE = dict(device="cpu", dtype="float32", max_num_seqs=4, num_gpu_blocks_override=256)
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# -------------------------------------------------------------------------------- strategies
ODD_TEXT = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\x00", "a\x00b", "", " ", "x" * 20000, "\U0001F600"])
TEXT = st.one_of(st.text(max_size=12), ODD_TEXT)
NUMBERS = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([INT64_MAX, INT64_MAX + 1, INT64_MIN, INT64_MIN - 1, 2 ** 64, 0, -1, 1, 1e-320,
                                     FLOAT32_MAX * 2, 10 ** 4000]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


POISON = st.one_of(
    SCALARS,
    st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                 max_leaves=6),
    st.integers(20, 200).map(nested),
    st.just(list(range(5000))),
)
VALID = {  # cheap to run: a few tokens, few samples
    "temperature": st.sampled_from([0, 0.7, 1.0, 1e30]), "top_p": st.sampled_from([0.5, 1.0]),
    "n": st.integers(1, 2), "stop": st.sampled_from(["\n", ["a", "\x00"], []]),
    "seed": st.sampled_from([0, INT64_MAX, INT64_MIN]), "presence_penalty": st.sampled_from([0.0, -2, 2]),
    "frequency_penalty": st.sampled_from([0.0, 1.5]), "top_k": st.sampled_from([-1, 0, 5, INT64_MAX]),
    "min_p": st.sampled_from([0.0, 0.1]), "repetition_penalty": st.sampled_from([1.0, 1.3, 1e-6]),
    "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 2), "stop_token_ids": st.sampled_from([[], [1]]),
    "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
}
COMPLETION_VALID = {**VALID, "logprobs": st.integers(0, 3), "prompt": st.sampled_from(
    ["Hello", "Numbers: 1 2 3", [1, 2, 3], ["a", "b\x00"], [[4, 5], [6]]])}
CHAT_VALID = {**VALID, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                          "content": st.sampled_from(["hi", "a\x00", ""])}),
                                   min_size=1, max_size=2)}


@st.composite
def bodies(draw, kind: str) -> dict:
    """A body whose every field is valid or poison; a prompt and a small token limit are always there."""
    valid = CHAT_VALID if kind == CHAT else COMPLETION_VALID
    prompt = "messages" if kind == CHAT else "prompt"
    limit = draw(st.sampled_from(["max_tokens", "max_completion_tokens"])) if kind == CHAT else "max_tokens"
    clean = draw(st.booleans())  # half the bodies have only valid values (their combination may still be refused)

    def value(strategy: st.SearchStrategy) -> object:
        return draw(strategy if clean else st.one_of(strategy, POISON))

    # (the limit is never None: a valid "no limit" would generate up to max_model_len tokens, slow on CPU)
    body = {prompt: value(valid[prompt]), limit: draw(st.integers(1, 3) if clean else st.one_of(
        st.integers(1, 3), POISON.filter(lambda v: v is not None)))}
    for name in draw(st.lists(st.sampled_from(sorted(valid)), max_size=4, unique=True)):
        body[name] = value(valid[name])
    if not clean and draw(st.integers(0, 4)) == 0:
        body[draw(st.sampled_from(["model", "user", "bogus", "stream", "best_of", "logit_bias"]))] = draw(POISON)
    return body


KIND_AND_BODY = st.sampled_from([COMPLETIONS, CHAT]).flatmap(lambda kind: st.tuples(st.just(kind), bodies(kind)))
RAW_BODIES = st.one_of(st.binary(max_size=64), st.integers(1000, 3000).map(lambda n: b"[" * n + b"]" * n),
                       st.just(b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}"), st.just(b'{"prompt": NaN}'),
                       st.just(b'{"prompt": "x", "prompt": 5}'), st.just(b"\xff\xfe\x00"))


@pytest.fixture(scope="module")
def engine(tiny_model_factory) -> Engine:
    return Engine(EngineConfig.from_kwargs(str(tiny_model_factory("llama")), **ENGINE))


# ---------------------------------------------------------------------------- the Python API
def test_fuzz_protocol_and_sampling_params(engine) -> None:
    """parse_request + make_prompts: an OpenAIError naming a body field, or params the sampler's
    tensors can hold; SamplingParams alone: a ValueError or a valid object."""

    @settings(max_examples=300, **FUZZ)
    @given(KIND_AND_BODY)
    def protocol(kind_body) -> None:
        kind, body = kind_body
        try:
            request = parse_request(kind, body)
            make_prompts(request, engine.tokenizer, engine)
        except OpenAIError as err:
            assert err.status == 400 and err.message and len(err.message) < 2000
            assert err.param is None or err.param.split("[")[0].split(".")[0] in body or err.param in \
                {"top_logprobs", "max_completion_tokens", "stream_options.include_usage"}, (err.param, body)
            return
        params = request.params
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            assert abs(getattr(params, name)) <= FLOAT32_MAX
        for name in ("top_k", "n", "seed", "max_tokens", "min_tokens"):
            value = getattr(params, name)
            assert value is None or INT64_MIN <= value <= INT64_MAX

    @settings(max_examples=200, **FUZZ)
    @given(st.dictionaries(st.sampled_from(sorted(VALID) + ["max_tokens", "logprobs", "best_of"]), POISON,
                           max_size=4))
    def sampling_params(kwargs) -> None:
        try:
            SamplingParams(**kwargs)
        except ValueError as err:
            assert str(err).startswith("invalid SamplingParams: ") and len(str(err)) < 2000

    protocol()
    sampling_params()


# ------------------------------------------------------------------------------ the server
def test_fuzz_server(tiny_model_factory) -> None:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from forkserve.entrypoints.engine_loop import EngineLoop
    from forkserve.entrypoints.server import build_app
    from test_server import ServerThread

    loop = EngineLoop(Engine(EngineConfig.from_kwargs(str(tiny_model_factory("llama")), **ENGINE)))
    statuses: list[int] = []
    with ServerThread(build_app(loop, ["tiny"], max_request_bytes=1 << 20)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:

        @settings(max_examples=40, **FUZZ)
        @given(KIND_AND_BODY)
        def bodies_over_http(kind_body) -> None:
            kind, body = kind_body
            path = "/v1/chat/completions" if kind == CHAT else "/v1/completions"
            r = http.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, (r.status_code, r.text[:500], body)
            if r.status_code == 200 and not body.get("stream"):
                choices = r.json()["choices"]
                assert len(choices) == len({c["index"] for c in choices}) >= 1  # each choice answered once
            elif r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        @settings(max_examples=15, **FUZZ)
        @given(RAW_BODIES, st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
        def raw_over_http(raw: bytes, content_type: str) -> None:
            r = http.post("/v1/completions", content=raw, headers={"Content-Type": content_type})
            assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])

        bodies_over_http()
        raw_over_http()
        assert http.get("/health").status_code == 200
        assert loop.alive and loop.faults == 0
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)  # the fuzz reached both sides


# ------------------------------------------------------------------------------- run-batch
LINE_PARTS = st.fixed_dictionaries({"method": st.one_of(st.just("POST"), st.just("POST"), POISON),
                                    "url": st.one_of(st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
                                                     POISON)})


@st.composite
def batch_lines(draw) -> list[bytes]:
    lines = []
    for i in range(draw(st.integers(1, 8))):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            lines.append(draw(RAW_BODIES).replace(b"\n", b" "))
        else:
            kind = draw(st.sampled_from([COMPLETIONS, CHAT]))
            parts = draw(LINE_PARTS) if choice == 1 else {"method": "POST", "url": "/v1/completions"
                                                          if kind == COMPLETIONS else "/v1/chat/completions"}
            custom_id = draw(POISON) if choice == 2 else f"id-{i}"
            lines.append(json.dumps({"custom_id": custom_id, **parts, "body": draw(bodies(kind))}).encode())
    return [line for line in lines if line.strip()]


def test_fuzz_run_batch(engine, tmp_path_factory) -> None:
    answered = {"ok": 0, "refused": 0}

    @settings(max_examples=20, **FUZZ)
    @given(batch_lines())
    def run_batch(lines: list[bytes]) -> None:
        folder = tmp_path_factory.mktemp("fuzz")
        inp, out = folder / "in.jsonl", folder / "out.jsonl"
        inp.write_bytes(b"\n".join(lines) + b"\n")
        with BatchRunner(inp, out) as runner:
            expected = {line.custom_id for line in runner.lines}
            runner.run(engine, ["tiny"], use_tqdm=False)
        records = [json.loads(text) for text in out.read_text().splitlines()]
        assert sorted(r["custom_id"] for r in records) == sorted(expected)  # every line once
        for line, record in zip(sorted(runner.lines, key=lambda l: l.custom_id),
                                sorted(records, key=lambda r: r["custom_id"])):
            if line.error is None and valid(line.url, line.body, engine):
                assert record["response"]["status_code"] == 200, record
                answered["ok"] += 1
            else:
                assert record["response"] is None and record["error"]["message"]
                answered["refused"] += 1

    run_batch()
    assert answered["ok"] >= 5 and answered["refused"] >= 5, answered  # the fuzz reached both sides


def valid(url: str, body: dict, engine: Engine) -> bool:
    from forkserve.entrypoints.openai_protocol import URLS

    try:
        request = parse_request(URLS[url], body)
        make_prompts(request, engine.tokenizer, engine)
        return not request.stream
    except OpenAIError:
        return False
