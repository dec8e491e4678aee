"""`forkserve run-batch` on CPU: result lines, per-line errors, duplicate refusal, resuming after
kill -9 at several points (a real subprocess) with every custom_id answered exactly once, and the
progress bar and summary."""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forkserve import LLM, SamplingParams
from forkserve.cli import main
from forkserve.config import EngineConfig
from forkserve.engine.engine import Engine
from forkserve.entrypoints.batch_output import recover_output
from forkserve.entrypoints.batch_runner import MALFORMED, BatchRunner

SYSTEM = "You are a helpful assistant. Answer briefly and clearly. " * 3
QUESTIONS = ["what is the capital of France?", "how many days are in a week?", "why is the sky blue?",
             "what is a prefix tree?", "what does paging do?", "what is continuous batching?"]
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-num-seqs", "2", "--num-gpu-blocks-override", "512"]


def line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def completion(custom_id: str, prompt, max_tokens: int = 8, **extra) -> str:
    return line(custom_id, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                               "temperature": 0, **extra})


def chat(custom_id: str, question: str, max_tokens: int = 8, **extra) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return line(custom_id, "/v1/chat/completions", {"model": "tiny", "messages": messages,
                                                    "max_completion_tokens": max_tokens, "temperature": 0, **extra})


def read_results(path: Path) -> dict[str, dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "torn last line"
    records = [json.loads(text) for text in raw.decode().splitlines()]
    ids = [r["custom_id"] for r in records]
    assert len(ids) == len(set(ids)), f"answered twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    for r in records:
        assert r["id"].startswith("batch_req_")
        assert (r["response"] is None) != (r["error"] is None)
    return {r["custom_id"]: r for r in records}


def run_cli(model_dir: str, inp: Path, out: Path, *extra: str) -> int:
    return main(["run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir, "--served-model-name", "tiny",
                 "--no-progress", *ENGINE_FLAGS, *extra])


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


def test_mixed_file(model_dir: str, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [chat(f"chat-{i}", q) for i, q in enumerate(QUESTIONS)]
    lines += [
        completion("fox", "The quick brown fox", max_tokens=10),
        completion("multi", ["Once upon a time", "Numbers: one"], max_tokens=4, n=2, temperature=0.7, seed=3,
                   logprobs=1),
        chat("lp", "hi", max_tokens=3, logprobs=True, top_logprobs=2),
        '{"custom_id": "torn", "method": "POST", "url": ',  # malformed: no custom_id can be read
        line("emb", "/v1/embeddings", {"input": "x"}),
        completion("hot", "x", temperature="hot"),
        completion("extra", "x", frobnicate=1),
        completion("wrong-model", "x").replace('"tiny"', '"gpt-4o"'),
        completion("long", [9] * 5000),
        completion("ids", [[5, 6, 7], [8, 9]], max_tokens=2),
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}),
        "",
    ]
    inp.write_text("\n".join(lines) + "\n")
    assert run_cli(model_dir, inp, out) == 0
    results = read_results(out)
    malformed = sorted(key for key in results if key.startswith(MALFORMED))
    torn, no_id = sorted(malformed, key=lambda key: "custom_id" in results[key]["error"]["message"])
    assert set(results) - set(malformed) == {*(f"chat-{i}" for i in range(6)), "fox", "multi", "lp", "emb", "hot",
                                             "extra", "wrong-model", "long", "ids"}

    def error(custom_id: str) -> dict:
        assert results[custom_id]["response"] is None
        return results[custom_id]["error"]

    assert error(torn)["code"] == "invalid_json" and "line 10" in error(torn)["message"]
    assert error("emb")["code"] == "invalid_url" and "/v1/embeddings" in error("emb")["message"]
    assert error("emb")["param"] == "url"
    assert error("hot") == {"code": "invalid_value", "param": "temperature",
                            "message": "invalid SamplingParams: temperature must be a number, got 'hot'"}
    assert error("extra")["code"] == "unknown_field" and "frobnicate" in error("extra")["message"]
    assert error("wrong-model")["code"] == "model_not_found"
    assert error("long")["code"] == "context_length_exceeded" and "max_model_len" in error("long")["message"]
    assert "custom_id" in error(no_id)["message"] and error(no_id)["param"] == "custom_id"
    assert [c["index"] for c in results["ids"]["response"]["body"]["choices"]] == [0, 1]

    llm = LLM(model_dir, device="cpu", dtype="float32")
    fox = results["fox"]["response"]
    assert fox["status_code"] == 200 and fox["request_id"]
    body = fox["body"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    expected = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert body["choices"][0]["text"] == expected.outputs[0].text
    assert body["usage"]["completion_tokens"] == len(expected.outputs[0].token_ids)

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[2]}]
    expected_chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    chat_body = results["chat-2"]["response"]["body"]
    assert chat_body["object"] == "chat.completion"
    assert chat_body["choices"][0]["message"] == {"role": "assistant", "content": expected_chat.outputs[0].text}
    # The shared system prompt is computed once: later chats find it in the prefix cache.
    cached = [results[f"chat-{i}"]["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for i in range(6)]
    assert sum(cached) >= 4 * 16

    multi = results["multi"]["response"]["body"]
    assert sorted(c["index"] for c in multi["choices"]) == [0, 1, 2, 3]
    assert all(len(c["logprobs"]["tokens"]) == 4 for c in multi["choices"])
    tokenizer = llm.get_tokenizer()
    prompts = ("Once upon a time", "Numbers: one")
    assert multi["usage"]["prompt_tokens"] == sum(len(tokenizer(p).input_ids) for p in prompts)
    lp = results["lp"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(lp) == 3 and all(len(t["top_logprobs"]) == 2 for t in lp)

    # A rerun finds everything answered and changes nothing.
    before = out.read_bytes()
    assert run_cli(model_dir, inp, out) == 0
    assert out.read_bytes() == before


def test_duplicate_custom_ids_refused(model_dir: str, tmp_path: Path, capsys) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([completion("a", "x"), completion("b", "y"), completion("a", "z"),
                              completion("c", "w"), completion("b", "v")]) + "\n")
    assert run_cli(model_dir, inp, out) != 0
    message = capsys.readouterr().err
    assert "'a' on lines 1, 3" in message and "'b' on lines 2, 5" in message
    assert not out.exists()


def test_torn_last_line_is_cut_and_redone(model_dir: str, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(completion(f"r{i}", f"Numbers: {i}", max_tokens=3) for i in range(4)) + "\n")
    done = json.dumps({"id": "batch_req_0", "custom_id": "r1", "response": None,
                       "error": {"code": "x", "message": "kept as it was"}}) + "\n"
    out.write_text(done + '{"id": "batch_req_1", "custom_id": "r2", "respo')
    assert recover_output(out).answered == {"r1": None}
    assert out.read_text() == done
    out.write_text(done + '{"id": "batch_req_1", "custom_id": "r2", "respo')
    assert run_cli(model_dir, inp, out) == 0
    results = read_results(out)
    assert set(results) == {"r0", "r1", "r2", "r3"}
    assert out.read_text().startswith(done)
    assert results["r2"]["response"]["status_code"] == 200


@pytest.mark.slow  # several engine start-ups in subprocesses
def test_kill_9_then_resume(model_dir: str, tmp_path: Path) -> None:
    """SIGKILL at several points (no output yet, some lines, most lines); reruns finish the file."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    total = 40
    lines = []
    for i in range(total):
        if i % 2:
            lines.append(chat(f"q{i}", f"{QUESTIONS[i % 6]} ({i})", max_tokens=24, ignore_eos=True))
        else:
            lines.append(completion(f"q{i}", f"{SYSTEM} Question {i}:", max_tokens=24, ignore_eos=True))
    inp.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "forkserve", "run-batch", "-i", str(inp), "-o", str(out), "--model", model_dir,
               "--served-model-name", "tiny", "--no-progress", *ENGINE_FLAGS]

    def count() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    progress = []
    for kill_at in (None, 5, 25):  # None: as soon as it runs, before any output
        start = count()
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_at is None or count() >= kill_at:
                break
            time.sleep(0.002)
        if kill_at is None:
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        progress.append((start, count(), proc.returncode))
        if out.exists():  # complete lines parse and are unique; a torn tail is for the rerun to cut
            complete = out.read_bytes()
            ids = [json.loads(text)["custom_id"] for text in complete[:complete.rfind(b"\n") + 1].splitlines()]
            assert len(ids) == len(set(ids))
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = read_results(out)
    assert set(results) == {f"q{i}" for i in range(total)}
    assert all(r["response"]["status_code"] == 200 for r in results.values())
    # The kills landed where meant: before any output, then part-way (the file grew, not complete).
    assert progress[0][1] == 0 and progress[0][2] == -signal.SIGKILL
    assert all(rc == -signal.SIGKILL for _, _, rc in progress), progress
    assert 5 <= progress[1][1] < total and progress[1][1] <= progress[2][1] < total, progress


def test_progress_bar_and_summary(model_dir: str, tmp_path: Path, capsys, caplog) -> None:
    """The bar counts requests (answered ones from a previous run included) and shows tokens/s and
    prefix reuse; the closing summary names what succeeded, failed and was skipped."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([chat(f"c{i}", q, max_tokens=4) for i, q in enumerate(QUESTIONS)]
                             + [completion("bad", "x", top_p=2)]) + "\n")
    out.write_text(json.dumps({"id": "batch_req_0", "custom_id": "c0", "response": None,
                               "error": {"code": "x", "message": "from an earlier run"}}) + "\n")
    runner = BatchRunner(inp, out)
    engine = Engine(EngineConfig.from_kwargs(model_dir, device="cpu", dtype="float32", max_num_seqs=2,
                                             num_gpu_blocks_override=512))
    with caplog.at_level(logging.INFO, logger="forkserve"):
        summary = runner.run(engine, ["tiny"], use_tqdm=True)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert re.search(r"run-batch: 100%.* 7/7 ", bar), bar
    shown = re.search(r"(\d+) tok/s, prefix reuse (\d+)%", bar)
    assert shown and int(shown[1]) > 0
    assert (summary.skipped, summary.succeeded, summary.failed, summary.generated_tokens) == (1, 5, 1, 20)
    assert summary.prefix_reuse > 0.3 and int(shown[2]) == round(100 * summary.prefix_reuse)
    assert f"7 requests: 5 succeeded, 1 failed, 1 already in {out}" in caplog.text
    assert f"({summary.prefix_reuse:.1%} from the prefix cache), 20 generated tokens" in caplog.text
