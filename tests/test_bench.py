"""The bench's workloads: the same request lists as ../shared/bench/workloads.py builds, and
warm-up batches that share no prefix with them; and the profile tools' GPU-timeline arithmetic."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.profile import device_spans, idle_between_kernels, idle_per_marker
from benchmarks.worker import warm_up_workloads
from benchmarks.workloads import build

SHARED_WORKLOADS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "workloads.py"


@pytest.mark.skipif(not SHARED_WORKLOADS.exists(), reason="../shared/bench/workloads.py is not present")
def test_request_lists_equal_the_shared_workloads() -> None:
    spec = importlib.util.spec_from_file_location("shared_workloads", SHARED_WORKLOADS)
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    ours = {name: build(name).requests for name in ("sharedprefix", "samples", "nosharing")}
    assert [(r.prompt_token_ids, r.max_tokens) for r in ours["sharedprefix"]] == shared.shared_prefix()
    assert [(r.prompt_token_ids, r.max_tokens, r.n) for r in ours["samples"]] == shared.parallel_samples()
    assert [(r.prompt_token_ids, r.max_tokens) for r in ours["nosharing"]] == shared.no_sharing()
    extraction = build("extraction")
    assert [(r.prompt_token_ids, r.max_tokens) for r in extraction.requests] == shared.extraction()
    assert extraction.schema == shared.EXTRACTION_SCHEMA and build("extractionfree").requests == extraction.requests
    assert all(r.n == 1 for name in ("sharedprefix", "nosharing") for r in ours[name])
    chat = build("chat")
    assert [(r.prompt_token_ids, r.max_tokens) for r in chat.requests] == shared.chat()
    assert chat.sampling == shared.CHAT_SAMPLING and all(r.n == 1 for r in chat.requests)


def test_warm_ups_share_no_prefix_with_the_timed_batches() -> None:
    """A warm-up prompt sharing a first page with a timed one would hand the timed batch cached KV."""
    def first_pages(workloads) -> set[tuple[int, ...]]:
        return {tuple(r.prompt_token_ids[:16]) for w in workloads for r in w.requests}

    timed = first_pages([build(name) for name in ("sharedprefix", "samples", "nosharing", "chat", "extraction")])
    warm = first_pages(warm_up_workloads(structured=True))
    assert warm and not timed & warm


def device_event(start: float, end: float, name: str, on_gpu: bool = True) -> SimpleNamespace:
    """What the profiler's events carry that the GPU timeline reads (times in microseconds)."""
    device = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name, device_type=device)


def test_idle_between_kernels_sums_gaps_by_the_kernels_around_them() -> None:
    # us: a [0, 100), b [90, 150) overlapping a, gap 50, a [200, 300), gap 100, copy [400, 410); a CPU event ignored
    events = [device_event(200, 300, "a"), device_event(0, 100, "a"), device_event(90, 150, "b"),
              device_event(400, 410, "copy"), device_event(150, 390, "host", on_gpu=False)]
    span, busy, gaps = idle_between_kernels(device_spans(SimpleNamespace(events=lambda: events)))
    assert span == pytest.approx(0.410) and busy == pytest.approx(0.260)
    assert gaps == [(pytest.approx(0.1), 1, "a", "copy"), (pytest.approx(0.05), 1, "b", "a")]


def test_idle_per_marker_splits_the_timeline_at_each_marker_kernel() -> None:
    # us: step 0 = mark [0, 1), a [1, 100), gap 50, b [150, 200); step 1 = mark [500, 501) after a gap of 300, c [501, 600)
    events = [device_event(0, 1, "mark"), device_event(1, 100, "a"), device_event(150, 200, "b"),
              device_event(500, 501, "mark"), device_event(501, 600, "c")]
    steps = idle_per_marker(device_spans(SimpleNamespace(events=lambda: events)), "mark")
    assert steps == [(pytest.approx(0.35), pytest.approx(0.3), "b", "mark"), (0.0, 0.0, "", "")]


def test_extraction_on_the_padded_tokenizer_gives_valid_objects(tmp_path: Path) -> None:
    """The bench's extraction path on CPU: a config-only model of a 32K vocabulary, the tiny tokenizer
    padded to it (its EOS ids special, the first one the tokenizer's eos), every output a complete
    object of the schema.

    Checked on the output's bytes, decoded as xgrammar reads them: its string rules count code
    points and admit UTF-8-encoded surrogates (ED A0-BF xx), which a tokenizer's decode turns into
    three U+FFFD each, so `schema_check` on the decoded text (the bench's count, the same for both
    engines) may find a maxLength exceeded where the grammar did not.
    """
    xgrammar = pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from transformers import AutoTokenizer

    from benchmarks.tokenizer import write_padded_tokenizer
    from benchmarks.worker import forkserve_runner, has_tokenizer, schema_check

    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, vocab_size=32128, bos_token_id=32000,
                  eos_token_id=[32001, 32009], torch_dtype="bfloat16", tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not has_tokenizer(str(tmp_path))
    write_padded_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 32128 and tokenizer.eos_token_id == 32001
    assert tokenizer.convert_ids_to_tokens([32000, 32009, 32127]) == ["<|pad_32000|>", "<|eos_32009|>",
                                                                      "<|special_32127|>"]
    runner = forkserve_runner(str(tmp_path), dict(device="cpu", num_gpu_blocks_override=512, block_size=16))
    workload = build("extraction", 512)
    outputs = runner.generate(workload)
    assert schema_check(workload.schema, outputs)["finish_reasons"] == {"stop": 4}
    token_bytes = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=32128).decoded_vocab
    for out in outputs:
        ids = out.outputs[0].token_ids
        assert ids[-1] in (32001, 32009)
        text = b"".join(token_bytes[t] for t in ids[:-1]).decode("utf-8", "surrogatepass")
        jsonschema.validate(json.loads(text, strict=False), workload.schema)


def test_phases_tool_times_methods_that_exist() -> None:
    """benchmarks/phases.py wraps methods by name: a renamed one would break the GPU run, not CI."""
    from benchmarks import phases

    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in phases.PHASES
               if not callable(getattr(owner, name, None))]
    assert not missing, missing
