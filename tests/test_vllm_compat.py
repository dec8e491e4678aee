"""vLLM's Python API surface on forkserve (issue 25): engine arguments, prompt types, generate /
chat / beam_search arguments, SamplingParams fields, RequestOutput fields and the LLM helpers,
each with vLLM's meaning as the expectation; prompt_logprobs against HF's log-softmax of the prompt."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forkserve import LLM, RequestOutputKind, SamplingParams, TextPrompt, TokensPrompt
from forkserve.config import EngineConfig
from forkserve.engine.generation_defaults import generation_defaults
from forkserve.sampling_params import BeamSearchParams
from hf_oracle import hf_model

PROMPT = "The quick brown fox jumps over the lazy dog. The weather today is mild"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
# Every vLLM setting the issue lists, at values forkserve honours (or, where vLLM ignores them too, accepts).
VLLM_SETTINGS = dict(tensor_parallel_size=1, pipeline_parallel_size=1, trust_remote_code=False, disable_log_stats=True,
                     kv_cache_dtype="auto", swap_space=4, generation_config="auto", revision="main",
                     enforce_eager=True, max_logprobs=-1, tokenizer_mode="auto", quantization=None)
CPU = dict(device="cpu", dtype="float32", block_size=4, num_gpu_blocks_override=2048)


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def llm(model_dir, tmp_path_factory) -> LLM:
    download_dir = str(tmp_path_factory.mktemp("downloads"))
    return LLM(model=model_dir, tokenizer=model_dir, download_dir=download_dir, **VLLM_SETTINGS, **CPU)


def hf_prompt_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: HF's log-softmax at each prompt position (position p predicts token p + 1)."""
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------- engine arguments
@pytest.mark.parametrize("setting, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
    (dict(pipeline_parallel_size=2), "pipeline_parallel_size=2 is not supported yet"),
    (dict(trust_remote_code=True), "never runs a checkpoint's own code"),
    (dict(kv_cache_dtype="fp8_e5m2"), "kv_cache_dtype='fp8_e5m2' is not supported yet"),
    (dict(prefill_backend="fa4"), "prefill_backend must be 'auto', 'fa2' or 'fa3'"),
    (dict(kv_cache_dtype="int3"), "kv_cache_dtype must be 'auto'"),
    (dict(quantization="awq"), "quantization='awq' is not supported yet"),
    (dict(enable_lora=True), "not supported yet"),
    (dict(no_such_setting=1), "unknown engine argument(s): no_such_setting"),
])
def test_settings_forkserve_cannot_honour_fail_clearly(setting, message) -> None:
    with pytest.raises(ValueError) as err:
        EngineConfig.from_kwargs("unused", **setting)
    assert message in str(err.value)


def test_a_hub_id_is_told_to_download_first() -> None:
    with pytest.raises(ValueError, match="not a local directory.*--local-dir"):
        LLM("meta-llama/Llama-3.1-8B-Instruct")


def test_vllm_settings_are_taken(llm) -> None:
    config = llm.llm_engine.config
    assert (config.tensor_parallel_size, config.kv_cache_dtype, config.max_logprobs) == (1, "auto", -1)
    assert llm.get_tokenizer() is llm.llm_engine.get_tokenizer() is not None


def test_llm_engine_steps_like_vllms(llm) -> None:
    """vLLM's loop over `llm.llm_engine`: add_request with a plain prompt, step until done."""
    engine = llm.llm_engine
    engine.add_request("mine", PROMPT, GREEDY)
    finished = []
    while engine.has_unfinished_requests():
        finished += engine.step()
    assert [o.request_id for o in finished] == ["mine"]
    assert finished[0].outputs[0].token_ids == llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("bad", PROMPT, SamplingParams(stop_token_ids=[10 ** 6]))


def test_generation_config_sets_default_sampling_params(model_dir, tmp_path: Path) -> None:
    """vLLM's generation_config: "auto" reads the model's generation_config.json, "vllm" ignores it,
    a directory names another file."""
    other = tmp_path / "gen"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                              "max_new_tokens": 64, "do_sample": True}))
    assert generation_defaults(str(other), "auto") == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 64}
    assert generation_defaults(str(other), "vllm") == {}
    assert generation_defaults(model_dir, str(other))["temperature"] == 0.6
    assert generation_defaults(model_dir, "auto") == {}  # the tiny model's file sets only token ids
    with pytest.raises(ValueError, match="no generation_config.json"):
        generation_defaults(model_dir, str(tmp_path))


def test_default_sampling_params(llm) -> None:
    assert llm.get_default_sampling_params() == SamplingParams()
    llm.llm_engine.default_sampling_overrides = {"temperature": 0.0, "max_tokens": 3}
    try:
        assert llm.get_default_sampling_params().temperature == 0.0
        out = llm.generate(PROMPT, use_tqdm=False)[0]  # no params: the defaults, as in vLLM
        assert len(out.outputs[0].token_ids) <= 3
    finally:
        llm.llm_engine.default_sampling_overrides = {}


# ----------------------------------------------------------------------------------- prompts and calls
def test_prompt_types(llm) -> None:
    text = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    typed = llm.generate([TextPrompt(prompt=PROMPT), TokensPrompt(prompt_token_ids=text.prompt_token_ids)], GREEDY,
                         use_tqdm=False)
    assert all(o.outputs[0].token_ids == text.outputs[0].token_ids for o in typed)
    assert typed[0].prompt == PROMPT and typed[1].prompt is None
    with pytest.raises(ValueError, match="cache_salt is not supported"):
        llm.generate(TextPrompt(prompt=PROMPT, cache_salt="tenant-1"), GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": None, "x": 1}}, GREEDY, use_tqdm=False)


def test_generate_priority(llm) -> None:
    assert len(llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False, priority=[0, 0])) == 2
    with pytest.raises(ValueError, match="priority scheduling"):
        llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False, priority=[1, 0])
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False, priority=[0])


def test_chat_arguments(llm) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]  # vLLM's "string" content format joins by newlines
    a, b = llm.chat(parts, GREEDY, use_tqdm=False)[0], llm.chat(joined, GREEDY, use_tqdm=False)[0]
    assert a.prompt == b.prompt and a.outputs[0].token_ids == b.outputs[0].token_ids

    no_prompt = llm.chat(joined, GREEDY, use_tqdm=False, add_generation_prompt=False)[0]
    assert a.prompt.endswith("<|im_start|>assistant\n") and not no_prompt.prompt.endswith("assistant\n")

    partial = joined + [{"role": "assistant", "content": "The answer is"}]
    cont = llm.chat(partial, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert cont.prompt.endswith("<|im_start|>assistant\nThe answer is")  # no end-of-turn after it
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(partial, GREEDY, use_tqdm=False, continue_final_message=True)

    template = "{% for m in messages %}{{ greeting }} {{ m['content'] }}|{% endfor %}"
    kw = llm.chat(joined, GREEDY, use_tqdm=False, chat_template=template, chat_template_kwargs={"greeting": "Hey"})[0]
    assert kw.prompt == "Hey Hello\nthere|"
    with pytest.raises(ValueError, match="only text parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], GREEDY,
                 use_tqdm=False)
    with pytest.raises(ValueError, match="tools are not supported"):
        llm.chat(joined, GREEDY, use_tqdm=False, tools=[{"type": "function", "function": {"name": "f"}}])


def test_beam_search_concurrency_limit(llm) -> None:
    prompts = [PROMPT, "Once upon a time", "A prefix tree stores strings"]
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    together = llm.beam_search(prompts, params)
    limited = llm.beam_search(prompts, params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in limited] == [[s.tokens for s in o.sequences] for o in together]
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(prompts, params, concurrency_limit=0)


# ----------------------------------------------------------------------------------- SamplingParams
def test_logit_bias_and_allowed_token_ids(llm) -> None:
    """vLLM: the bias is added to the logits before sampling; logprobs stay the raw model's."""
    base = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    target = 7 if base.token_ids[0] != 7 else 8
    biased = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, ignore_eos=True,
                                                 logit_bias={target: 100.0}), use_tqdm=False)[0].outputs[0]
    assert biased.token_ids == [target] * 4
    assert biased.logprobs[0][target].logprob < base.logprobs[0][base.token_ids[0]].logprob  # raw, unbiased
    allowed = [11, 12, 13]
    sampled = llm.generate(PROMPT, SamplingParams(n=4, seed=0, temperature=1.0, max_tokens=8, ignore_eos=True,
                                                  allowed_token_ids=allowed), use_tqdm=False)[0]
    assert all(t in allowed for c in sampled.outputs for t in c.token_ids)
    # JSON-style string keys are token ids too
    assert SamplingParams(logit_bias={"5": 1}).logit_bias == {5: 1.0}


def test_token_controls_cost_nothing_to_other_rows(llm) -> None:
    """A plain request batched with one that biases tokens draws exactly what it draws alone."""
    plain = SamplingParams(temperature=0.9, seed=3, max_tokens=8, ignore_eos=True)
    alone = llm.generate(PROMPT, plain, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate([PROMPT, PROMPT], [plain, plain.replace(logit_bias={5: 50.0}, bad_words=["fox"])],
                         use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone and mixed[1].outputs[0].token_ids != alone


def test_bad_words(llm) -> None:
    """vLLM's rule: a word is banned as it tokenizes at the start of a text and after a space; a
    word of several tokens bans its last token where the output ends with the others."""
    base = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    tokenizer, engine = llm.get_tokenizer(), llm.llm_engine

    def word_of(tokens: list[int]) -> list[str]:  # the word, if banning it bans exactly these tokens
        word = tokenizer.decode(tokens).strip()
        return [word] if tokens in engine.inputs.bad_words_token_ids([word]) else []

    words = [w for i in range(len(base) - 1) for w in word_of(base[i:i + 2])][:1] + \
        [w for i in range(len(base)) for w in word_of(base[i:i + 1])][:1]
    assert len(words) == 2, "the greedy output should hold a one-token and a two-token word"
    banned = engine.inputs.bad_words_token_ids(words)
    out = llm.generate(PROMPT, GREEDY.replace(bad_words=words), use_tqdm=False)[0].outputs[0].token_ids
    assert out != base
    for word in banned:
        assert not any(out[i:i + len(word)] == word for i in range(len(out))), (word, out)


def test_truncate_detokenize_and_carried_fields(llm) -> None:
    full = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    cut = llm.generate(PROMPT, GREEDY.replace(truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert cut.prompt_token_ids == full.prompt_token_ids[-5:]
    raw = llm.generate(PROMPT, GREEDY.replace(detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY,
                                              extra_args={"trace": 1}, spaces_between_special_tokens=False),
                       use_tqdm=False)[0]
    assert raw.outputs[0].token_ids == full.outputs[0].token_ids and raw.outputs[0].text == ""
    with pytest.raises(ValueError, match="stop needs detokenize"):
        SamplingParams(detokenize=False, stop=["x"])
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_logprobs_minus_one_is_the_whole_vocabulary(llm) -> None:
    vocab = llm.llm_engine.model_config.vocab_size
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2, logprobs=-1), use_tqdm=False)[0]
    entry = out.outputs[0].logprobs[0]
    assert len(entry) == vocab
    assert abs(sum(torch.tensor([lp.logprob for lp in entry.values()]).exp().tolist()) - 1.0) < 1e-4
    engine = llm.llm_engine
    engine.inputs.max_logprobs = 20  # the limit the input checks read (engine/inputs.py)
    try:
        with pytest.raises(ValueError, match="exceeds max_logprobs=20"):
            llm.generate(PROMPT, SamplingParams(logprobs=-1), use_tqdm=False)
        with pytest.raises(ValueError, match="prompt_logprobs=21 exceeds"):
            llm.generate(PROMPT, SamplingParams(prompt_logprobs=21), use_tqdm=False)
    finally:
        engine.inputs.max_logprobs = -1


@pytest.mark.parametrize("params, field", [
    (SamplingParams(max_tokens=5000), "max_tokens"),
    (SamplingParams(stop_token_ids=[100000]), "stop_token_ids"),
    (SamplingParams(allowed_token_ids=[3, 100000]), "allowed_token_ids"),
    (SamplingParams(logit_bias={100000: 1.0}), "logit_bias"),
])
def test_out_of_range_requests_are_errors(llm, params, field) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate([PROMPT, PROMPT], [GREEDY, params], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # nothing of the batch was left queued


# ----------------------------------------------------------------------------------- outputs and helpers
def test_request_metrics(llm) -> None:
    out = llm.generate(PROMPT, GREEDY, use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.num_generation_tokens == len(out.outputs[0].token_ids) and m.time_to_first_token >= 0


def test_reset_prefix_cache(llm) -> None:
    prompt = "A prefix tree stores strings so that strings sharing a beginning share a path from the root."
    llm.generate(prompt, GREEDY, use_tqdm=False)
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache() is True
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].num_cached_tokens == 0


def test_get_metrics(llm) -> None:
    def by_name() -> dict[str, object]:
        return {(m.name, m.labels.get("finished_reason")): m for m in llm.get_metrics()}

    llm.generate(PROMPT, GREEDY, use_tqdm=False)  # its prefix is in the cache for the batch below
    before = by_name()
    llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False)
    after = by_name()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert (name, None) in after
    assert after[("vllm:prompt_tokens", None)].value > before[("vllm:prompt_tokens", None)].value
    assert after[("vllm:generation_tokens", None)].value - before[("vllm:generation_tokens", None)].value == 12
    assert after[("vllm:request_success", "length")].value - before[("vllm:request_success", "length")].value == 2
    assert after[("vllm:prefix_cache_hits", None)].value > before[("vllm:prefix_cache_hits", None)].value
    ttft = after[("vllm:time_to_first_token_seconds", None)]
    assert ttft.count - before[("vllm:time_to_first_token_seconds", None)].count == 2
    assert ttft.buckets["+Inf"] == ttft.count


# ----------------------------------------------------------------------------------- prompt_logprobs
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prompt_logprobs_match_hf(tiny_model_factory, family) -> None:
    """Equal to HF's log-softmax of the prompt, in chunked prefill (8 tokens a step), for a prompt
    whose prefix the cache already holds (it is recomputed: vLLM does the same) and for a cache miss."""
    model_dir = str(tiny_model_factory(family))
    llm = LLM(model_dir, max_num_batched_tokens=8, max_logprobs=5, **CPU)
    shared = "A prefix tree stores strings so that strings sharing a beginning share a path."
    llm.generate(shared + " First.", GREEDY, use_tqdm=False)  # puts the shared prefix in the cache
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=3)
    for prompt, cached in ((shared + " Second.", True), ("Numbers: one two three four five six seven.", False)):
        ids = llm.get_tokenizer()(prompt).input_ids
        assert (llm.llm_engine.tree.match_len(ids) >= 16) == cached
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert out.prompt_token_ids == ids and out.num_cached_tokens == 0  # cached positions were recomputed
        reference = hf_prompt_logprobs(model_dir, ids)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        for p, entry in enumerate(out.prompt_logprobs[1:]):
            row, actual = reference[p], ids[p + 1]
            assert abs(entry[actual].logprob - row[actual].item()) < 1e-4
            assert entry[actual].rank == int((row > row[actual]).sum()) + 1
            top = torch.topk(row, 3)
            ours = [t for t, lp in sorted(entry.items(), key=lambda item: item[1].rank) if lp.rank <= 3]
            assert torch.allclose(torch.tensor([entry[t].logprob for t in ours]), top.values, atol=1e-4)
