"""n > 1 and best_of: the prompt is prefilled once and the samples fork its pages."""
from __future__ import annotations

import random

import pytest

from cpu_llm import PAGE, cpu_llm
from forkserve import LLM, BeamSearchParams, SamplingParams



def _prompt(llm: LLM, length: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, llm.engine.model_config.vocab_size) for _ in range(length)]}


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


def test_samples_prefill_once_and_equal_separate_requests(model_dir: str) -> None:
    llm = cpu_llm(model_dir)
    prompt = _prompt(llm, 22)
    params = SamplingParams(n=5, seed=11, temperature=0.8, top_p=0.95, max_tokens=12, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    stats = llm.engine.stats()
    assert stats["prompt_tokens"] == 22
    assert stats["prefill_tokens_computed"] == 22  # once, not 5 x 22
    assert stats["decode_tokens"] == 5 * (12 - 1)  # each first token came from the one prefill's logits
    assert [c.index for c in out.outputs] == list(range(5))
    # Sample i equals a request with seed 11 + i, run separately on an engine with no cache to share.
    alone = cpu_llm(model_dir, enable_prefix_caching=False)
    singles = alone.generate([prompt] * 5, [params.replace(n=1, seed=11 + i) for i in range(5)], use_tqdm=False)
    assert [c.token_ids for c in out.outputs] == [s.outputs[0].token_ids for s in singles]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert alone.engine.stats()["prefill_tokens_computed"] == 5 * 22
    llm.engine.tree.check_invariants()


def test_wide_forks_past_max_num_seqs(model_dir: str) -> None:
    """A fork wider than max_num_seqs: drawn in slices of that many rows, scheduled in turns."""
    params = SamplingParams(n=5, seed=2, temperature=1.0, max_tokens=7, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": [7, 8, 9, 10, 11]}, {"prompt_token_ids": [12, 13, 14]}]
    wide = cpu_llm(model_dir)
    narrow = cpu_llm(model_dir, max_num_seqs=2)
    for w, n in zip(wide.generate(prompts, params, use_tqdm=False), narrow.generate(prompts, params, use_tqdm=False)):
        assert [c.token_ids for c in n.outputs] == [c.token_ids for c in w.outputs]
        # Logprobs agree up to float noise (the model ran different batch shapes).
        assert [c.cumulative_logprob for c in n.outputs] == pytest.approx([c.cumulative_logprob for c in w.outputs],
                                                                          abs=1e-4)


def test_best_of_keeps_the_n_most_likely(model_dir: str) -> None:
    llm = cpu_llm(model_dir)
    prompt = _prompt(llm, 9, seed=1)
    base = SamplingParams(seed=3, temperature=1.0, max_tokens=6, ignore_eos=True, logprobs=0)
    best = llm.generate(prompt, base.replace(n=2, best_of=5), use_tqdm=False)[0].outputs
    stats = llm.engine.stats()
    # best_of forks like n: the prompt once, then 5 samples of which 2 are returned.
    assert stats["prefill_tokens_computed"] == 9 and stats["decode_tokens"] == 5 * (6 - 1)
    every = llm.generate(prompt, base.replace(n=5), use_tqdm=False)[0].outputs
    ranked = sorted(every, key=lambda c: -c.cumulative_logprob)[:2]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked]
    assert [c.index for c in best] == [0, 1]


@pytest.mark.parametrize("prompt_len", [20, 22])  # page-aligned and with a partial last page
def test_peak_pages_of_forked_samples(model_dir: str, prompt_len: int) -> None:
    n, new = 8, 13
    llm = cpu_llm(model_dir)
    llm.generate(_prompt(llm, prompt_len, seed=2), SamplingParams(n=n, seed=0, max_tokens=new, ignore_eos=True),
                 use_tqdm=False)
    prompt_pages = -(-prompt_len // PAGE)
    peak = llm.engine.stats()["peak_pages_in_use"]
    assert peak <= prompt_pages + n * -(-new // PAGE) + n
    assert peak < n * prompt_pages  # far below what unshared prompts alone would take
    series = llm.engine.pages_in_use_series()
    assert len(series) == llm.engine.stats()["steps"] and max(series) == peak
    assert llm.engine.pages_in_use == 0  # everything finished: nothing held, the rest is idle cache


def test_forks_on_a_tiny_pool_preempt_and_stay_exact(model_dir: str) -> None:
    params = SamplingParams(n=6, seed=4, temperature=0.9, max_tokens=20, ignore_eos=True)
    roomy = cpu_llm(model_dir)
    prompts = [_prompt(roomy, 30, seed=5), _prompt(roomy, 11, seed=6)]
    expected = roomy.generate(prompts, params, use_tqdm=False)
    tiny = cpu_llm(model_dir, num_gpu_blocks_override=16,
               max_model_len=60)
    got = tiny.generate(prompts, params, use_tqdm=False)
    assert tiny.engine.scheduler.num_preemptions > 0
    for e, g in zip(expected, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in e.outputs]
    tiny.engine.tree.check_invariants()
    assert tiny.engine.pages_in_use == 0


def test_snapshot_before_the_fork_lists_every_sample(model_dir: str) -> None:
    llm = cpu_llm(model_dir, max_num_batched_tokens=8)
    llm.engine.add_request("r", llm.engine.make_prompt(_prompt(llm, 20), "r"), SamplingParams(n=3, max_tokens=2))
    llm.engine.step()  # a prefill chunk: nothing sampled yet
    snapshot = llm.engine.peek_output("r")
    assert [c.index for c in snapshot.outputs] == [0, 1, 2] and all(not c.token_ids for c in snapshot.outputs)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def test_widths_are_validated(model_dir: str) -> None:
    llm = cpu_llm(model_dir, max_n=4)
    prompt = {"prompt_token_ids": [4, 5, 6]}
    with pytest.raises(ValueError, match=r"request 0: n=5 exceeds max_n=4"):
        llm.generate(prompt, SamplingParams(n=5), use_tqdm=False)
    with pytest.raises(ValueError, match=r"best_of=6 exceeds max_n=4"):
        llm.generate(prompt, SamplingParams(n=2, best_of=6), use_tqdm=False)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="beam_width=5 exceeds max_n=4"):
        llm.beam_search([prompt], BeamSearchParams(beam_width=5, max_tokens=4))
    with pytest.raises(ValueError, match="max_n"):
        LLM(model_dir, device="cpu", max_n=0)
    assert not llm.engine.scheduler.has_work()


def test_admission_reserves_every_sample_so_prompts_prefill_once(model_dir: str) -> None:
    """A pool that holds about two requests' samples at a time: the others wait, none is preempted."""
    params = SamplingParams(n=4, seed=1, temperature=1.0, max_tokens=16, ignore_eos=True)
    llm = cpu_llm(model_dir, num_gpu_blocks_override=2 * (3 + 4 * (16 // PAGE + 1)) + 2, max_model_len=40)
    prompts = [_prompt(llm, 10, seed=s) for s in range(6)]
    out = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(c.token_ids) == 16 for o in out for c in o.outputs)
    stats = llm.engine.stats()
    assert stats["preemptions"] == 0
    assert stats["prefill_tokens_computed"] == 6 * 10
