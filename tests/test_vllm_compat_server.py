"""vLLM's server, CLI and run-batch surface on forkserve (issue 25), with vLLM's semantics as the
expectation: the official openai client against a loopback server, raw httpx for what the client
cannot send, the CLI's parser in-process, and run-batch through `forkserve.cli.main`."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from forkserve.cli import build_parser, main  # noqa: E402
from forkserve.config import EngineConfig  # noqa: E402
from forkserve.engine.engine import Engine  # noqa: E402
from forkserve.entrypoints.engine_loop import EngineLoop  # noqa: E402
from forkserve.entrypoints.server import build_app  # noqa: E402
from hf_oracle import hf_model  # noqa: E402
from test_server import ServerThread  # noqa: E402

NAME = "tiny"
PROMPT = "The quick brown fox jumps over the lazy dog."
ENGINE = dict(device="cpu", dtype="float32", max_num_seqs=4, max_model_len=256, block_size=4,
              num_gpu_blocks_override=1024)
MESSAGES = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def served(model_dir):
    loop = EngineLoop(Engine(EngineConfig.from_kwargs(model_dir, **ENGINE)))
    with ServerThread(build_app(loop, [NAME], response_role="assistant")) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=body, timeout=60)


# ----------------------------------------------------------------------------------- completions
def test_echo_and_return_token_ids(client, served) -> None:
    plain = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                       extra_body={"return_token_ids": True})
    choice = echoed.choices[0]
    assert choice.text == PROMPT + plain.choices[0].text
    ids = post(served, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert choice.model_extra["prompt_token_ids"] == ids and len(choice.model_extra["token_ids"]) == 4
    streamed = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_continuous_usage_stats(client) -> None:
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts and counts == sorted(counts) and chunks[-1].usage.completion_tokens == 4


def test_echo_with_logprobs_covers_the_prompt(client, served) -> None:
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    prompt_len = len(post(served, "/tokenize", {"prompt": PROMPT}).json()["tokens"])
    assert len(lp.tokens) == len(lp.token_logprobs) == prompt_len + 3
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])


def test_prompt_logprobs_match_hf(client, served, model_dir) -> None:
    import torch

    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2, "return_token_ids": True})
    choice = out.choices[0].model_extra
    ids, entries = choice["prompt_token_ids"], choice["prompt_logprobs"]
    with torch.inference_mode():
        reference = torch.log_softmax(hf_model(model_dir)(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    assert entries[0] is None and len(entries) == len(ids)
    for p, entry in enumerate(entries[1:]):
        assert abs(entry[str(ids[p + 1])]["logprob"] - reference[p, ids[p + 1]].item()) < 1e-4
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 3


def test_logit_bias(client) -> None:
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                    logit_bias={"9": 100}, extra_body={"return_token_ids": True, "ignore_eos": True})
    assert out.choices[0].model_extra["token_ids"] == [9, 9, 9]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3, logit_bias={"999999": 1})
    assert err.value.body["param"] == "logit_bias"


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"stop_token_ids": [999_999]}, "stop_token_ids"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream: true
    ({"use_beam_search": True, "stream": True}, "use_beam_search"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
])
def test_refused_fields_name_the_field(served, body, param) -> None:
    r = post(served, "/v1/completions", {"model": NAME, "prompt": PROMPT, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_use_beam_search_matches_llm_beam_search(client, model_dir) -> None:
    from forkserve import LLM
    from forkserve.sampling_params import BeamSearchParams

    out = client.completions.create(model=NAME, prompt=[PROMPT, "Once upon a time"], max_tokens=4, n=2,
                                    extra_body={"use_beam_search": True, "return_token_ids": True})
    llm = LLM(model_dir, **ENGINE)
    expected = llm.beam_search([PROMPT, "Once upon a time"], BeamSearchParams(beam_width=2, max_tokens=4))
    got = [c.model_extra["token_ids"] for c in sorted(out.choices, key=lambda c: c.index)]
    prompt_lens = [len(llm.get_tokenizer()(p).input_ids) for p in (PROMPT, "Once upon a time")]
    assert got == [s.tokens[prompt_lens[i]:] for i, o in enumerate(expected) for s in o.sequences]
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3, n=2,
                                          extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2


# ----------------------------------------------------------------------------------- chat
def test_chat_template_fields(client, served) -> None:
    def prompt_ids(**extra) -> list[int]:
        out = client.chat.completions.create(model=NAME, messages=extra.pop("messages", MESSAGES), max_tokens=1,
                                             extra_body={"return_token_ids": True, **extra})
        return out.model_extra["prompt_token_ids"]

    def tokenized(**extra) -> list[int]:
        return post(served, "/tokenize", {"messages": extra.pop("messages", MESSAGES), **extra}).json()["tokens"]

    assert prompt_ids() == tokenized()
    assert prompt_ids(add_generation_prompt=False) == tokenized(add_generation_prompt=False) != tokenized()
    partial = MESSAGES + [{"role": "assistant", "content": "Well"}]
    cont = dict(messages=partial, add_generation_prompt=False, continue_final_message=True)
    assert prompt_ids(**cont) == tokenized(**cont)
    template = "{% for m in messages %}{{ prefix }}{{ m['content'] }}{% endfor %}"
    ids = prompt_ids(chat_template=template, chat_template_kwargs={"prefix": "Q: "})
    assert post(served, "/detokenize", {"tokens": ids}).json()["prompt"] == "Q: Hello there"
    r = post(served, "/v1/chat/completions", {"messages": partial, "continue_final_message": True})
    assert r.status_code == 400 and "cannot both be true" in r.json()["error"]["message"]


def test_chat_echo_and_content_parts(client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    a = client.chat.completions.create(model=NAME, messages=parts, max_tokens=4, temperature=0)
    b = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello\nthere"}],
                                       max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    partial = MESSAGES + [{"role": "assistant", "content": "Well,"}]
    echoed = client.chat.completions.create(model=NAME, messages=partial, max_tokens=3, temperature=0,
                                            extra_body={"echo": True, "add_generation_prompt": False,
                                                        "continue_final_message": True})
    assert echoed.choices[0].message.content.startswith("Well,")


# ----------------------------------------------------------------------------------- routes and guards
def test_routes(served, client, model_dir) -> None:
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert httpx.get(f"{served.url}/version", timeout=10).json()["version"]
    assert httpx.get(f"{served.url}/ping", timeout=10).status_code == 200
    ids = post(served, "/tokenize", {"prompt": PROMPT}).json()
    assert ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 256
    assert post(served, "/detokenize", {"tokens": ids["tokens"]}).json()["prompt"].endswith(PROMPT)
    assert post(served, "/detokenize", {"tokens": [10 ** 7]}).status_code == 400
    # the --model value names the model too, beside --served-model-name (as the README says)
    assert client.completions.create(model=model_dir, prompt=PROMPT, max_tokens=1).model == model_dir


def test_wrong_content_type_is_refused(served) -> None:
    r = httpx.post(f"{served.url}/v1/completions", content=json.dumps({"prompt": PROMPT}),
                   headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]


def test_vllm_metric_names(served, client) -> None:
    client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3)
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_hits_total",
                 "vllm:prefix_cache_queries_total", "vllm:request_success_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_sum", "forkserve_requests_running"):
        assert name in text, name
    generated = next(line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total{"))
    assert f'model_name="{NAME}"' in generated and float(generated.split()[-1]) >= 3


# ----------------------------------------------------------------------------------- CLI
def test_help_does_not_import_torch() -> None:
    code = "import sys; from forkserve.cli import build_parser; build_parser().format_help(); " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_takes_vllm_flags(model_dir) -> None:
    from forkserve.cli import engine_kwargs
    from forkserve.entrypoints.commands import _resolve_model

    args = build_parser().parse_args(["serve", model_dir, "--tensor-parallel-size", "1", "--enforce-eager",
                                      "--max-logprobs", "5", "--kv-cache-dtype", "auto", "--generation-config", "vllm",
                                      "--tokenizer", model_dir, "--chat-template", "{{ x }}", "--response-role", "bot",
                                      "--disable-log-requests", "--uvicorn-log-level", "warning"])
    _resolve_model(args)
    assert args.model == model_dir and args.response_role == "bot" and args.disable_log_requests
    config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
    assert (config.max_logprobs, config.enforce_eager, config.generation_config) == (5, True, "vllm")
    args = build_parser().parse_args(["serve", model_dir, "--pipeline-parallel-size", "2"])
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 is not supported yet"):
        EngineConfig.from_kwargs(args.model_tag, **engine_kwargs(args))
    args = build_parser().parse_args(["serve", "a", "--model", "b"])
    with pytest.raises(ValueError, match="two models"):
        _resolve_model(args)


def test_generate_stop_and_logprobs(model_dir, capsys) -> None:
    flags = ["--model", model_dir, "--device", "cpu", "--dtype", "float32", "--num-gpu-blocks-override", "256",
             "--max-tokens", "6", "--logprobs", "2"]
    assert main(["generate", *flags, "--prompt", PROMPT]) == 0
    full = capsys.readouterr().out
    assert full.count(" *") == 6  # one chosen token marked per generated token
    text = full.split("\n")[1]
    stop = text.strip()[:2]
    assert stop and main(["generate", *flags, "--prompt", PROMPT, "--stop", stop]) == 0
    assert "finish: stop" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- run-batch
def test_run_batch_exit_status_and_retry_failed(model_dir, tmp_path: Path, caplog) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}} for i in range(2)]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    flags = ["run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir, "--no-progress", "--device", "cpu",
             "--dtype", "float32", "--num-gpu-blocks-override", "256"]
    assert main(flags) == 1  # no served name 'tiny': every line fails, so the run fails
    assert all(json.loads(x)["error"]["code"] == "model_not_found" for x in out.read_text().splitlines())
    with caplog.at_level(logging.INFO, logger="forkserve"):
        assert main(flags + ["--served-model-name", "tiny"]) == 1  # answered already, all failed
    assert "2 of them failed" in caplog.text and "--retry-failed" in caplog.text
    assert main(flags + ["--served-model-name", "tiny", "--retry-failed"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in records) == ["r0", "r1"] and all(r["error"] is None for r in records)
