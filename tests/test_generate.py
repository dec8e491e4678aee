"""End to end on CPU: greedy output equals HF transformers' in every scheduling setting."""
from __future__ import annotations

import gc
import random

import pytest

from forkserve import LLM, SamplingParams
from hf_oracle import assert_matches_hf

FAMILIES = ["llama", "qwen2", "qwen3"]
MAX_NEW = 24


def prompts_with_shared_prefix(vocab: int, seed: int = 0) -> list[list[int]]:
    """Mixed lengths, some sharing a long prefix (so prefix reuse has something to reuse)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(37)]
    prompts = [shared + [rng.randrange(3, vocab) for _ in range(n)] for n in (1, 9, 23)]
    prompts += [[rng.randrange(3, vocab) for _ in range(n)] for n in (2, 17, 61)]
    prompts.append(list(shared))  # a prompt that is a prefix of others
    return prompts


SETTINGS = {
    "prefix_reuse_on": dict(enable_prefix_caching=True),
    "prefix_reuse_off": dict(enable_prefix_caching=False),
    "chunked_prefill": dict(max_num_batched_tokens=7, block_size=4),
    "preemption": dict(num_gpu_blocks_override=30, block_size=4, max_model_len=120, reserve_output_kv=False),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_hf(tiny_model_factory, family: str, setting: str) -> None:
    model_dir = str(tiny_model_factory(family))
    llm = LLM(model_dir, device="cpu", dtype="float32", **SETTINGS[setting])
    steps = record_steps(llm)
    vocab = llm.engine.model_config.vocab_size
    prompts = prompts_with_shared_prefix(vocab)
    # Two passes: the second finds the first's prompts cached (when reuse is on).
    for _ in range(2):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
        for prompt, output in zip(prompts, outputs):
            assert output.prompt_token_ids == prompt
            assert_matches_hf(model_dir, prompt, output.outputs[0].token_ids, MAX_NEW)
    cached = sum(o.num_cached_tokens for o in outputs)
    if setting == "prefix_reuse_off":
        assert cached == 0
    elif setting == "prefix_reuse_on":
        assert cached > 0
    if setting == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    if setting == "chunked_prefill":
        # The budget held, prompts were split across steps, and prefill chunks ran beside decodes.
        assert max(sum(n for _, n, _ in step) for step in steps) <= 7
        assert any(computed + n < prompt_len for step in steps for computed, n, prompt_len in step)
        assert any(any(computed >= p for computed, _, p in step) and any(computed < p for computed, _, p in step)
                   for step in steps)
    llm.engine.tree.check_invariants()


def record_steps(llm: LLM) -> list[list[tuple[int, int, int]]]:
    """Per scheduled step, (tokens computed before, new tokens, prompt length) of each sequence."""
    steps: list[list[tuple[int, int, int]]] = []
    schedule = llm.engine.scheduler.schedule

    def recording_schedule() -> list:
        batch = schedule()
        steps.append([(item.seq.num_computed_tokens, item.num_new_tokens, item.seq.num_prompt_tokens)
                      for item in batch])
        return batch

    llm.engine.scheduler.schedule = recording_schedule
    return steps


def test_seeded_sampling_is_batch_independent(tiny_model_factory) -> None:
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype="float32")
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(3)
    target = {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(12)]}
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))]} for _ in range(5)]
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=15)] * 2 + [params]
                         + [SamplingParams(temperature=0.7, seed=9, max_tokens=30)] * 3, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    again = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    other_seed = llm.generate([target], params.replace(seed=4321), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_text_prompts_stop_strings_and_chat(tiny_model_factory) -> None:
    llm = LLM(str(tiny_model_factory("qwen2")), device="cpu", dtype="float32")
    tok = llm.get_tokenizer()
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)[0]
    full = out.outputs[0].text
    assert out.prompt == "The quick brown fox"
    assert full == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    # Pick a stop string from the middle of the greedy text: the output must end right before it.
    if len(full) > 6:
        stop = full[3:6]
        cut = llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.stop_reason == stop
        assert cut.text == full[:full.find(stop)]
    chat = llm.chat([{"role": "user", "content": "hello there"}], SamplingParams(max_tokens=5), use_tqdm=False)[0]
    assert chat.prompt_token_ids == tok(tok.apply_chat_template([{"role": "user", "content": "hello there"}],
                                                                tokenize=False, add_generation_prompt=True),
                                        add_special_tokens=False).input_ids


def test_logprobs_min_tokens_and_n(tiny_model_factory) -> None:
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype="float32")
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, min_tokens=6),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top-ranked token
        assert len(entry) == 3
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))
    multi = llm.generate(prompt, SamplingParams(n=3, seed=7, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in multi.outputs] == [0, 1, 2]
    for i, completion in enumerate(multi.outputs):
        single = llm.generate(prompt, SamplingParams(seed=7 + i, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert completion.token_ids == single[0].outputs[0].token_ids


def changed_after_construction(**changes: object) -> SamplingParams:
    """Valid params with fields set afterwards (the dataclass is mutable): generate must re-check them."""
    params = SamplingParams(max_tokens=3)
    for name, value in changes.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize("prompt, params, needle", [
    ("", SamplingParams(), "prompt is empty"),
    ({"prompt_token_ids": []}, SamplingParams(), "prompt is empty"),
    ({"prompt_token_ids": [1, 10**9]}, SamplingParams(), "outside the vocabulary"),
    ({"prompt_token_ids": [-1]}, SamplingParams(), "outside the vocabulary"),
    ({"prompt_token_ids": [1, True]}, SamplingParams(), "list of ints"),
    ({"prompt_token_ids": [1, 2.0]}, SamplingParams(), "list of ints"),
    ({"prompt_token_ids": list(range(3, 300))}, SamplingParams(), "max_model_len"),
    ({"prompt_token_ids": [1, 2], "bogus": 1}, SamplingParams(), "bogus"),
    ({"prompt_token_ids": [1, 2]}, {"temperature": 0.5}, "SamplingParams"),
    ({"prompt_token_ids": [1, 2]}, changed_after_construction(temperature=-1.0), "temperature"),
    ({"prompt_token_ids": [1, 2]}, changed_after_construction(top_p=0.0), "top_p"),
    ({"prompt_token_ids": [1, 2]}, changed_after_construction(n=0), "n must"),
    ({"prompt_token_ids": [1, 2]}, changed_after_construction(max_tokens=0), "max_tokens"),
])
def test_bad_request_names_the_request_and_runs_nothing(tiny_model_factory, prompt, params, needle) -> None:
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype="float32", max_model_len=256)
    good = {"prompt_token_ids": [4, 5, 6]}
    with pytest.raises(ValueError, match=needle) as err:
        llm.generate([good, prompt], [SamplingParams(max_tokens=3), params], use_tqdm=False)
    assert "request 1" in str(err.value)
    engine = llm.engine
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_work()
    assert engine.tree.num_free_pages == engine.pool.num_pages
    # The engine is still usable afterwards.
    assert len(llm.generate(good, SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("conversation", [[], [{"role": "user"}], ["hi"]], ids=["empty", "no_content", "not_a_dict"])
def test_bad_chat_names_the_conversation_and_runs_nothing(tiny_model_factory, conversation: list) -> None:
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype="float32", num_gpu_blocks_override=256)
    with pytest.raises(ValueError, match="conversation 1"):
        llm.chat([[{"role": "user", "content": "hi"}], conversation], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.stats()["steps"] == 0


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0), ("bogus", 1),
])
def test_invalid_sampling_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_unknown_engine_argument(tiny_model_factory) -> None:
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM(str(tiny_model_factory("llama")), device="cpu", max_num_seq=3)


def test_generate_leaves_the_garbage_collector_as_it_found_it(tiny_model_factory) -> None:
    """A batch is validated and planned with the collector off (gc_switches.gc_off_while_planning), then runs
    with the objects alive at its start, those planning made included, frozen and full collections
    deferred (gc_switches.gc_frozen_for_batch): afterwards the collector is on, nothing of it stays
    frozen, the thresholds are back, and a caller's own freeze, or switching the collector off, is
    left in place."""
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype="float32")
    engine = llm.engine
    frozen_during: list[int] = []
    thresholds_during: list[tuple[int, int, int]] = []
    enabled_while_planning: list[bool] = []
    step, make_prompt, add_requests = engine.step, engine.make_prompt, engine.add_requests
    collections: list[str] = []  # "validating", "step" and a "collection" per collection, in order
    gc.callbacks.append(lambda phase, info: phase == "start" and collections.append("collection"))

    def watched_step():
        collections.append("step")
        frozen_during.append(gc.get_freeze_count())
        thresholds_during.append(gc.get_threshold())
        return step()

    engine.step = watched_step
    engine.make_prompt = lambda *a: collections.append("validating") or \
        enabled_while_planning.append(gc.isenabled()) or make_prompt(*a)
    engine.add_requests = lambda *a: enabled_while_planning.append(gc.isenabled()) or add_requests(*a)
    thresholds = gc.get_threshold()
    try:  # enough requests that planning makes more objects than a young collection waits for
        llm.generate([{"prompt_token_ids": [4, 5, i]} for i in range(100)], SamplingParams(max_tokens=2),
                     use_tqdm=False)
    finally:
        gc.callbacks.pop()
    assert enabled_while_planning == [False] * 101 and gc.isenabled()
    assert min(frozen_during) > 0 and gc.get_freeze_count() == 0
    # No collection walked what validation and planning made before the first step.
    assert "collection" not in collections[collections.index("validating"):collections.index("step")]
    assert all(t[:2] == thresholds[:2] and t[2] > 1000 * thresholds[2] for t in thresholds_during)
    assert gc.get_threshold() == thresholds
    gc.freeze()
    gc.disable()
    try:
        callers = gc.get_freeze_count()
        llm.generate([{"prompt_token_ids": [7, 8]}], SamplingParams(max_tokens=2), use_tqdm=False)
        assert gc.get_freeze_count() >= callers and not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
