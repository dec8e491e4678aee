"""Structured outputs on the tiny random-weight model: every constrained output parses and
validates (jsonschema is the oracle for JSON, re.fullmatch for regexes), with n > 1, mixed with
unconstrained requests, through LLM.generate, tree search, the server and run-batch; the same
seed gives the same output alone or in a batch; bad constraints are errors that name the field
and lose nothing else; a request whose grammar is still compiling waits while others run."""
from __future__ import annotations

import json
import re
from concurrent.futures import Future
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from forkserve import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from forkserve.cli import main  # noqa: E402
from forkserve.entrypoints.openai_protocol import OpenAIError, parse_request  # noqa: E402
from forkserve.structured.matcher import GrammarState  # noqa: E402
from cpu_llm import cpu_llm  # noqa: E402

MAX_TOKENS = 64  # every valid object of the schemas below fits well inside this


def _string(n: int) -> dict:
    return {"type": "string", "maxLength": n}


def _integer(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


def _object(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def json_schemas() -> list[dict]:
    """30 distinct schemas: nested objects, arrays, enums, bounded numbers, optional fields."""
    schemas = []
    for k in range(1, 4):
        schemas += [
            _object({"name": _string(3 + k), "age": _integer(0, 10 ** k)}),
            _object({"color": _enum(*["red", "green", "blue", "cyan"][:k + 1])}),
            _object({"tags": {"type": "array", "items": _string(k + 1), "maxItems": k}}),
            _object({"point": _object({"x": _integer(-k, k), "y": _integer(-10 * k, 0)})}),
            _object({"ok": {"type": "boolean"}, "none": {"type": "null"}, "level": _integer(k, 2 * k)}),
            _object({"id": _integer(100 * k, 100 * k + 99), "kind": _enum("a", "b")}, required=["id"]),
            _object({"items": {"type": "array", "items": _object({"key": _enum("x", "y"), "v": _integer(0, k)}),
                               "minItems": 1, "maxItems": k}}),
            _object({"score": {"type": "number", "minimum": 0, "maximum": k}}),
            {"type": "array", "items": _integer(0, 9 * k), "minItems": 1, "maxItems": k + 1},
            _object({"outer": _object({"inner": _object({"leaf": _enum("p", "q"), "depth": _integer(0, k)})})}),
        ]
    return schemas


REGEXES = [r"\d{3}-\d{4}", r"[a-c]{2,5}", r"(yes|no)", r"[A-Z][a-z]{1,4}", r"\d{1,3}\.\d{2}",
           r"[a-z]{1,5}@[a-z]{1,4}\.(com|org)", r"#[0-9a-f]{6}", r"(cat|dog)s?", r"-?[1-9]\d{0,2}", r"[xyz]{4}"]
CHOICES = [["yes", "no"], ["red", "green", "blue"], ["A", "B", "C", "D"], ["true", "false"],
           ["Paris", "London", "Rome"], ["up", "down"], ["one two", "three"], ['quote "x"', "back\\slash"],
           ["α", "β", "γ"], ["north", "south", "east", "west"]]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def llm(model_dir: str) -> LLM:
    return cpu_llm(model_dir, max_num_seqs=128)


def parse_json(text: str) -> object:
    """JSON as xgrammar constrains it: a string with maxLength compiles to [^"\\\r\n]{0,n}, so raw
    control characters (which strict parsers refuse) may appear in one; everything else is strict."""
    return json.loads(text, strict=False)


def grammar_text(llm: LLM, token_ids: list[int]) -> str:
    """An output as its grammar read it: the tokens' bytes (stop tokens left out), each lead byte
    with its continuation bytes one character. xgrammar's string rules count characters so and
    admit sequences that are not valid UTF-8 (encoded surrogates ED A0-BF xx; lead bytes F5-F7 in
    0.2.7), which the tokenizer's decode shows as one U+FFFD per byte (so a maxLength can look
    exceeded); here each is one character, as the grammar counted it."""
    import xgrammar

    token_bytes = xgrammar.TokenizerInfo.from_huggingface(llm.engine.tokenizer).decoded_vocab
    stops = llm.engine.stop_token_ids
    data = b"".join(token_bytes[t] for t in token_ids if t not in stops)
    chars, at = [], 0
    while at < len(data):
        lead = data[at]
        size = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
        try:
            chars.append(data[at:at + size].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            chars.append("\ufffd")
        at += size
    return "".join(chars)


def check_output(spec: StructuredOutputsParams, text: str) -> None:
    """The oracle: JSON parses and validates, a regex matches whole, a choice is one of its strings."""
    if spec.json is not None:
        jsonschema.validate(parse_json(text), spec.json)
    elif spec.json_object:
        assert isinstance(json.loads(text), dict), text
    elif spec.regex is not None:
        assert re.fullmatch(spec.regex, text), (spec.regex, text)
    else:
        assert text in spec.choice, (spec.choice, text)


def constrained_batch() -> list[tuple[str, SamplingParams]]:
    """50 constrained requests (every fifth with n=2) and 5 unconstrained ones, interleaved."""
    specs = ([StructuredOutputsParams(json=s, disable_any_whitespace=True) for s in json_schemas()]
             + [StructuredOutputsParams(regex=r) for r in REGEXES]
             + [StructuredOutputsParams(choice=c) for c in CHOICES])
    batch = []
    for i, spec in enumerate(specs):
        batch.append((f"Question {i}: give the answer.",
                      SamplingParams(temperature=1.0, seed=i, n=2 if i % 5 == 0 else 1, max_tokens=MAX_TOKENS,
                                     structured_outputs=spec)))
        if i % 10 == 9:
            batch.append((f"Free text {i}", SamplingParams(temperature=1.0, seed=i, max_tokens=8)))
    return batch


def test_fifty_constrained_requests_validate_in_a_mixed_batch(llm: LLM) -> None:
    batch = constrained_batch()
    outputs = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
    checked = 0
    for (_, params), out in zip(batch, outputs):
        assert len(out.outputs) == params.n
        for completion in out.outputs:
            if params.structured_outputs is None:
                assert len(completion.token_ids) == 8 or completion.finish_reason == "stop"
                continue
            assert completion.finish_reason == "stop", (params.structured_outputs, completion.text)
            check_output(params.structured_outputs, grammar_text(llm, completion.token_ids))
            checked += 1
    assert checked == 60  # 50 requests, 10 of them with two samples
    samples = [[c.text for c in out.outputs] for (_, p), out in zip(batch, outputs) if p.n == 2]
    assert sum(a != b for a, b in samples) >= 5, "the two samples of a request draw from their own seeds"

    # The same seed gives the same constrained output alone as in the batch.
    for i in (1, 33, 47):
        prompt, params = batch[i]
        alone = llm.generate(prompt, params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == outputs[i].outputs[0].token_ids


def test_masks_filled_a_step_ahead_match_sync(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Async scheduling fills a step's masks while its forward runs, taking the previous step's
    tokens early: the outputs equal those of steps that wait for their tokens, also when a pool
    too small for the batch preempts sequences (recomputed, their grammar state kept)."""
    early: list[int] = []
    accept_early = GrammarState.accept_early
    monkeypatch.setattr(GrammarState, "accept_early", lambda self, token: (early.append(token),
                                                                          accept_early(self, token)))
    batch = constrained_batch()[::6]
    outputs = {}
    for async_scheduling in (False, True):
        llm = cpu_llm(model_dir, num_gpu_blocks_override=40, async_scheduling=async_scheduling,
                      reserve_output_kv=False, max_model_len=80)
        outputs[async_scheduling] = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        assert bool(early) == async_scheduling
    for (_, params), sync_out, async_out in zip(batch, outputs[False], outputs[True]):
        for a, b in zip(sync_out.outputs, async_out.outputs):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            if params.structured_outputs is not None:
                check_output(params.structured_outputs, grammar_text(llm, b.token_ids))


def test_grammar_json_object_and_finish_reasons(llm: LLM) -> None:
    grammar = 'root ::= "(" item ("," item){0,2} ")"\nitem ::= [a-z] | [0-9]{2}'
    cases = [StructuredOutputsParams(grammar=grammar), StructuredOutputsParams(json_object=True)]
    outs = llm.generate(["Grammar:", "Object:"], [SamplingParams(seed=5, max_tokens=MAX_TOKENS, structured_outputs=c)
                                                  for c in cases], use_tqdm=False)
    assert re.fullmatch(r"\(([a-z]|\d\d)(,([a-z]|\d\d)){0,2}\)", outs[0].outputs[0].text)
    # Any JSON object: the random model may not close it within max_tokens; if it did, it parses.
    first = outs[1].outputs[0]
    assert first.text.startswith("{")
    if first.finish_reason == "stop":
        assert isinstance(json.loads(first.text), dict)

    # A JSON cut off by max_tokens reports "length"; ignore_eos still stops when the grammar is complete.
    spec = StructuredOutputsParams(json=_object({"a": _string(8), "b": _string(8)}), disable_any_whitespace=True)
    cut = llm.generate("Cut:", SamplingParams(seed=1, max_tokens=4, structured_outputs=spec), use_tqdm=False)[0]
    assert cut.outputs[0].finish_reason == "length" and len(cut.outputs[0].token_ids) == 4
    full = llm.generate("Cut:", SamplingParams(seed=1, max_tokens=MAX_TOKENS, ignore_eos=True,
                                               structured_outputs=spec), use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "stop"
    check_output(spec, grammar_text(llm, full.token_ids))


def test_invalid_constraints_name_the_field_and_lose_nothing(llm: LLM) -> None:
    with pytest.raises(ValueError, match="exactly one of json, regex, choice, grammar or json_object.*json, regex"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})
    good = SamplingParams(seed=0, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    for bad, field in [(StructuredOutputsParams(json={"type": 3}), "json is not a valid JSON schema"),
                       (StructuredOutputsParams(json="{not json"), "json is not a valid JSON schema"),
                       (StructuredOutputsParams(regex="(ab"), "regex is not a valid regular expression"),
                       (StructuredOutputsParams(grammar="root ::= missing"), "grammar is not a valid EBNF")]:
        with pytest.raises(ValueError, match=f"request 1: invalid StructuredOutputsParams: {field}"):
            llm.generate(["x", "y"], [good, SamplingParams(structured_outputs=bad)], use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
    assert llm.generate("x", good, use_tqdm=False)[0].outputs[0].text in ("a", "b")


def test_a_request_waits_for_its_grammar_while_others_run(llm: LLM) -> None:
    engine = llm.engine
    spec = StructuredOutputsParams(regex=r"[0-9]{4}")
    engine.check_params(SamplingParams(structured_outputs=spec), "request")
    compiled = engine.structured.grammars.submit(spec)
    slow: Future = Future()  # a compile that has not finished yet
    engine.structured.grammars._compiled[spec.key] = slow
    try:
        plain, constrained = engine.add_requests([
            ("plain", engine.make_prompt("Hello", "p"), SamplingParams(seed=0, max_tokens=4, ignore_eos=True)),
            ("constrained", engine.make_prompt("Hello", "c"), SamplingParams(seed=0, structured_outputs=spec))])
        finished = []
        while not plain.is_finished:
            finished += [o.request_id for o in engine.step()]
        assert finished == ["plain"] and constrained.seqs[0].num_computed_tokens == 0
        slow.set_result(compiled.result())
        while engine.has_unfinished_requests():
            finished += [o.request_id for o in engine.step()]
        assert finished == ["plain", "constrained"]
        assert re.fullmatch(r"[0-9]{4}", engine.outputs.make_output(constrained).outputs[0].text)
    finally:
        engine.structured.grammars._compiled[spec.key] = compiled


def test_tree_search_forks_continue_the_parents_grammar(llm: LLM) -> None:
    spec = StructuredOutputsParams(regex=r"(ab|cd)-[0-9]{2}")
    root = llm.start("Pick:", SamplingParams(seed=3, max_tokens=2, structured_outputs=spec))
    first = root.fork(2)
    llm.advance()
    assert all(re.fullmatch(r"(ab|cd)|(ab|cd)-|a|c|(ab|cd)-[0-9]", n.text) for n in first), [n.text for n in first]
    rest = [child for node in first for child in node.fork(2, SamplingParams(seed=9, max_tokens=8,
                                                                          structured_outputs=spec))]
    llm.advance()
    for child in rest:
        assert re.fullmatch(r"(ab|cd)-[0-9]{2}", child.text), child.text


# ------------------------------------------------------------------------------------ protocol
def test_request_bodies_map_onto_structured_outputs() -> None:
    schema = _object({"a": _integer(0, 3)})
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    cases = {
        "response_format": ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}},
                            StructuredOutputsParams(json=schema)),
        "structured_outputs": ({"regex": "[ab]+", "disable_any_whitespace": True},
                               StructuredOutputsParams(regex="[ab]+", disable_any_whitespace=True)),
        "guided_choice": (["x", "y"], StructuredOutputsParams(choice=["x", "y"])),
        "guided_json": (schema, StructuredOutputsParams(json=schema)),
        "guided_grammar": ('root ::= "a"', StructuredOutputsParams(grammar='root ::= "a"')),
    }
    for name, (value, expected) in cases.items():
        request = parse_request("chat", {**chat, name: value})
        assert request.params.structured_outputs == expected and request.structured_param == name
    assert parse_request("chat", {**chat, "response_format": {"type": "json_object"}}).params.structured_outputs \
        == StructuredOutputsParams(json_object=True)
    assert parse_request("chat", {**chat, "response_format": {"type": "text"}}).params.structured_outputs is None
    assert parse_request("completion", {"prompt": "x", "guided_regex": "a"}).params.structured_outputs.regex == "a"
    # vLLM's structured_outputs may carry only options for response_format's schema.
    merged = parse_request("chat", {**chat, "structured_outputs": {"disable_any_whitespace": True},
                                    "response_format": {"type": "json_object"}})
    assert merged.params.structured_outputs == StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    for body, param in [({**chat, "response_format": {"type": "xml"}}, "response_format"),
                        ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                         "response_format"),
                        ({**chat, "structured_outputs": {"regex": "a", "frob": 1}}, "structured_outputs"),
                        ({**chat, "guided_choice": []}, "guided_choice"),
                        ({**chat, "guided_regex": "a", "guided_json": {}}, "guided_regex"),
                        ({**chat, "guided_regex": "a", "structured_outputs": {"regex": "b"}}, "structured_outputs")]:
        with pytest.raises(OpenAIError) as err:
            parse_request("chat", body)
        assert err.value.param == param, err.value.message


def test_server_response_format(model_dir: str) -> None:
    openai = pytest.importorskip("openai")
    from forkserve.config import EngineConfig
    from forkserve.engine.engine import Engine
    from forkserve.entrypoints.engine_loop import EngineLoop
    from forkserve.entrypoints.server import build_app
    from test_server import ServerThread

    loop = EngineLoop(Engine(EngineConfig.from_kwargs(model_dir, device="cpu", dtype="float32",
                                                      num_gpu_blocks_override=512)))
    schema = _object({"city": _enum("Paris", "Rome"), "rank": _integer(1, 5)})
    with ServerThread(build_app(loop, ["tiny"])) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Which city?"}]
        out = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=MAX_TOKENS, seed=0, n=2,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
            extra_body={"structured_outputs": {"disable_any_whitespace": True}})
        for choice in out.choices:
            jsonschema.validate(parse_json(choice.message.content), schema)
        out = client.completions.create(model="tiny", prompt="Code:", max_tokens=MAX_TOKENS, seed=0,
                                        extra_body={"structured_outputs": {"regex": "[A-Z]{3}[0-9]"}})
        assert re.fullmatch("[A-Z]{3}[0-9]", out.choices[0].text)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=messages, extra_body={"guided_regex": "(a"})
        assert err.value.body["param"] == "guided_regex" and "regex is not a valid" in err.value.body["message"]
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)  # still serving
        assert out.choices[0].finish_reason is not None
    loop.stop()


def test_run_batch_lines(model_dir: str, tmp_path: Path) -> None:
    schema = _object({"answer": _enum("yes", "no"), "confidence": _integer(0, 100)})
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Is it?"}], "max_tokens": MAX_TOKENS,
            "seed": 1}
    lines = {
        "schema": {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
                   "structured_outputs": {"disable_any_whitespace": True}},
        "bad-schema": {**body, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "a", "schema": {"type": "frob"}}}},
        "choice": {**body, "structured_outputs": {"choice": ["left", "right"]}},
        "plain": {**body, "max_tokens": 4},
    }
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                       "body": b}) + "\n" for cid, b in lines.items()))
    assert main(["run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir, "--served-model-name", "tiny",
                 "--no-progress", "--device", "cpu", "--dtype", "float32", "--num-gpu-blocks-override", "512"]) == 0
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(results) == set(lines)
    jsonschema.validate(parse_json(results["schema"]["response"]["body"]["choices"][0]["message"]["content"]), schema)
    assert results["choice"]["response"]["body"]["choices"][0]["message"]["content"] in ("left", "right")
    assert results["plain"]["error"] is None
    assert results["bad-schema"]["response"] is None and "json is not a valid JSON schema" in \
        results["bad-schema"]["error"]["message"]
