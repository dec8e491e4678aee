"""Poison request bodies (issue 24): every numeric field bounded to what the sampler's tensors hold,
lone surrogates and bad types refused by field, nesting and huge numbers in the JSON itself, and
the server still answering after all of them. Through the protocol layer (fast, many cases) and
once through a real loopback server and run-batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from forkserve import LLM, SamplingParams
from forkserve.cli import main
from forkserve.config import EngineConfig
from forkserve.engine.engine import Engine
from forkserve.engine.summary import batch_summary
from forkserve.entrypoints.batch_runner import MALFORMED
from forkserve.entrypoints.openai_protocol import CHAT, COMPLETIONS, OpenAIError, make_prompts, parse_json, parse_request

MESSAGES = [{"role": "user", "content": "hi"}]
NON_FINITE = [float("nan"), float("inf"), float("-inf"), 1e308, 10 ** 40]
BEYOND_INT64 = [2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]
FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
INTS = ("top_k", "n", "seed", "max_tokens", "min_tokens", "logprobs")


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def engine(model_dir) -> Engine:
    return Engine(EngineConfig.from_kwargs(model_dir, device="cpu", dtype="float32", num_gpu_blocks_override=256))


def refused(engine: Engine, kind: str, body: dict) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        make_prompts(parse_request(kind, body), engine.tokenizer, engine)
    assert caught.value.status == 400 and caught.value.message
    return caught.value


def poison_cases() -> list[tuple[str, dict, str]]:
    """(kind, body, the param its error must name)."""
    cases = []
    for name in FLOATS:
        for value in [*NON_FINITE, True, "1", [], {}]:
            cases.append((COMPLETIONS, {"prompt": "x", name: value}, name))
    for name in INTS:
        for value in [*BEYOND_INT64, True, 1.0, float("nan"), "1", []]:
            cases.append((COMPLETIONS, {"prompt": "x", name: value}, name))
    cases += [
        (COMPLETIONS, {"prompt": "x", "top_k": 9223372036854775808}, "top_k"),  # the case
        (COMPLETIONS, {"prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty"),
        (COMPLETIONS, {"prompt": "x", "n": 1000000}, "n"),
        (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "best_of": True}, "best_of"),
        (COMPLETIONS, {"prompt": "x", "stop": ["ok", "\ud800"]}, "stop"),
        (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop"),
        (COMPLETIONS, {"prompt": "x", "stop": [["nested"]]}, "stop"),
        (COMPLETIONS, {"prompt": "x", "stop_token_ids": [2 ** 63]}, "stop_token_ids"),
        (COMPLETIONS, {"prompt": "x", "stop_token_ids": [True]}, "stop_token_ids"),
        (COMPLETIONS, {"prompt": "\ud800"}, "prompt"),
        (COMPLETIONS, {"prompt": ["fine", "\udfff"]}, "prompt"),
        (COMPLETIONS, {"prompt": ""}, "prompt"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": [[]]}, "prompt"),
        (COMPLETIONS, {"prompt": [True, 1]}, "prompt"),
        (COMPLETIONS, {"prompt": [2 ** 63]}, "prompt"),
        (COMPLETIONS, {"prompt": "word " * 5000}, "prompt"),
        (COMPLETIONS, {"prompt": "x", "model": 5}, "model"),
        (COMPLETIONS, {"prompt": "x", "user": ["me"]}, "user"),
        (COMPLETIONS, {"prompt": "x", "stream": 1}, "stream"),
        (COMPLETIONS, {"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
         "stream_options.include_usage"),
        (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # needs stream
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": -1}, "max_completion_tokens"),
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": 2 ** 70}, "max_completion_tokens"),
        (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": True}, "top_logprobs"),
        (CHAT, {"messages": MESSAGES, "logprobs": 1}, "logprobs"),
        (CHAT, {"messages": MESSAGES, "n": 10 ** 6}, "n"),
        (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, "messages[0].content"),
        (CHAT, {"messages": [{"role": "\ud800", "content": "x"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (CHAT, {"messages": MESSAGES * 3000}, "messages"),
        (CHAT, {"messages": "hi"}, "messages"),
    ]
    return cases


def test_poison_bodies_name_their_field(engine) -> None:
    failures = []
    for kind, body, param in poison_cases():
        error = refused(engine, kind, body)
        if error.param != param:
            failures.append((body, param, error.param, error.message))
    assert not failures, failures


def test_messages_say_the_body_field() -> None:
    """max_completion_tokens and top_logprobs are named as sent, not as SamplingParams calls them."""
    error = refused_parse(CHAT, {"messages": MESSAGES, "max_completion_tokens": -1})
    assert "max_completion_tokens must be at least 1" in error.message and "max_tokens" not in error.message
    error = refused_parse(COMPLETIONS, {"prompt": "x", "temperature": float("nan")})
    assert error.param == "temperature" and "finite" in error.message
    # a poison value is shown bounded, however large or deep it is
    error = refused_parse(COMPLETIONS, {"prompt": "x", "stop": [[[[["deep"]]]]] * 100000})
    assert len(error.message) < 300


def refused_parse(kind: str, body: dict) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse_request(kind, body)
    return caught.value


def test_edges_that_are_valid_stay_valid(engine) -> None:
    """The bounds are the engine's, not tighter: int64 seeds either side, huge top_k, NUL bytes."""
    for body in ({"prompt": "x", "seed": 2 ** 63 - 1, "n": 2}, {"prompt": "x", "seed": -(2 ** 63)},
                 {"prompt": "x", "top_k": 2 ** 63 - 1}, {"prompt": "a\x00b", "stop": ["\x00"]},
                 {"prompt": "x", "temperature": 1e30}, {"prompt": "x", "repetition_penalty": 1e-6}):
        make_prompts(parse_request(COMPLETIONS, body), engine.tokenizer, engine)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"{\"a\": " * 5000 + b"1" + b"}" * 5000,
                                 b'{"n": ' + b"9" * 5000 + b"}", b"\xff\xfe", b'{"prompt": "x",'])
def test_json_that_cannot_be_read_is_an_error(raw: bytes) -> None:
    with pytest.raises(OpenAIError) as caught:
        parse_json(raw)
    assert caught.value.code == "invalid_json" and caught.value.status == 400


def test_python_api_refuses_poison(model_dir) -> None:
    """The same bounds through LLM / SamplingParams: a ValueError naming the field, nothing run."""
    for name, value in [("top_k", 2 ** 63), ("temperature", float("nan")), ("seed", 2 ** 64),
                        ("repetition_penalty", float("inf")), ("stop", "\ud800")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})
    llm = LLM(model_dir, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    with pytest.raises(ValueError, match="lone surrogate"):
        llm.generate("\ud800", use_tqdm=False)
    with pytest.raises(ValueError, match="not valid Unicode"):
        llm.chat([{"role": "user", "content": "\ud800"}], use_tqdm=False)
    params = SamplingParams(max_tokens=3)
    params.top_k = 2 ** 63  # set after construction: checked again before it runs
    with pytest.raises(ValueError, match="top_k"):
        llm.generate("fine", params, use_tqdm=False)
    assert llm.generate("fine", SamplingParams(max_tokens=3, seed=2 ** 63 - 1, n=2), use_tqdm=False)[0].outputs


def test_prefix_reuse_is_never_negative() -> None:
    """Preemption can recompute more than the tree saved: reuse floors at 0 (issue: -362.0%)."""
    before = dict(prompt_tokens=0, prefill_tokens_computed=0)
    after = dict(prompt_tokens=100, prefill_tokens_computed=462, peak_pages_in_use=1, pages_in_use=0, kv_pages=8)
    assert batch_summary(before, after)["prefix_reuse"] == 0.0
    after["prefill_tokens_computed"] = 40
    assert batch_summary(before, after)["prefix_reuse"] == 0.6


def test_poison_batch_lines(model_dir: str, tmp_path: Path) -> None:
    """A file of good lines between poison ones: every good line answered once and as LLM answers
    it, every poison line an error record naming its field (the issue's cases among them)."""
    good = {f"good-{i}": {"prompt": f"Numbers: {i}", "max_tokens": 3, "temperature": 0} for i in range(4)}
    poison = {
        "top-k": ({"prompt": "x", "top_k": 9223372036854775808}, "top_k"),
        "nan": ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        "surrogate": ({"prompt": "\ud800"}, "prompt"),
        "seed": ({"prompt": "x", "seed": 2 ** 64}, "seed"),
        "n": ({"prompt": "x", "n": 1000000}, "n"),
    }
    lines = []
    for i, (cid, body) in enumerate(good.items()):
        lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": body}))
        cid_p, (body_p, _) = list(poison.items())[i]
        lines.append(json.dumps({"custom_id": cid_p, "method": "POST", "url": "/v1/completions", "body": body_p}))
    lines.append(json.dumps({"custom_id": "n", "method": "POST", "url": "/v1/completions",
                             "body": poison["n"][0]}))
    lines.append('{"custom_id": "deep", "body": ' + "[" * 1000 + "]" * 1000 + "}")  # RecursionError in parsing
    lines.append('{"custom_id": "digits", "body": {"n": ' + "9" * 5000 + "}}")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir, "--no-progress",
                 "--device", "cpu", "--dtype", "float32", "--num-gpu-blocks-override", "256"]) == 0
    records = [json.loads(text) for text in out.read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in records}
    assert len(records) == len(by_id) == len(good) + len(poison) + 2
    llm = LLM(model_dir, device="cpu", dtype="float32", num_gpu_blocks_override=256)
    for cid, body in good.items():
        expected = llm.generate(body["prompt"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
        assert by_id[cid]["response"]["body"]["choices"][0]["text"] == expected.outputs[0].text
    for cid, (_, param) in poison.items():
        assert by_id[cid]["response"] is None and by_id[cid]["error"]["param"] == param, by_id[cid]
    malformed = [r for cid, r in by_id.items() if cid.startswith(MALFORMED)]
    assert len(malformed) == 2 and all(r["error"]["code"] == "invalid_json" for r in malformed)
