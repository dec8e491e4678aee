"""Tensor parallelism on the CPU (gloo): two ranks give the tokens one rank and HF give, with
prefix reuse, cascade levels and forks on; a rank that dies ends the batch with an error naming
it, in bounded time, and leaves no process behind; bad sizes are refused before anything starts."""
from __future__ import annotations

import os
import signal
import time

import pytest

from cpu_llm import cpu_llm
from forkserve import SamplingParams
from forkserve.distributed import RankFailure
from forkserve.engine.sharing import CascadeRule
from forkserve.model.tiny import make_tiny_model
from hf_oracle import hf_greedy

SHARED = list(range(10, 50))  # a 40-token shared prefix: reuse, cascade levels, partly filled pages
PROMPTS = [SHARED + [60 + i, 70 + i] for i in range(3)]


def greedy(llm, prompts, max_tokens=8):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                        use_tqdm=False)]


def assert_matches_hf(model_dir, prompts, outputs, max_tokens=8) -> None:
    for prompt, tokens in zip(prompts, outputs):
        ref = hf_greedy(str(model_dir), prompt, max_tokens)
        upto = max_tokens if ref.tie_step is None else ref.tie_step
        assert tokens[:upto] == ref.tokens[:upto]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_two_ranks_give_one_ranks_and_hf_tokens_with_forks_and_cascade(tiny_model_factory, family) -> None:
    model_dir = tiny_model_factory(family)
    one = cpu_llm(str(model_dir))
    two = cpu_llm(str(model_dir), tensor_parallel_size=2)
    try:
        for llm in (one, two):
            llm.engine.steps.sharing.rule = CascadeRule(1, 1)  # the tiny prompts are below the real rule
        expected = greedy(one, PROMPTS)
        assert greedy(two, PROMPTS) == expected
        assert_matches_hf(model_dir, PROMPTS, expected)
        assert two.engine.stats()["cascade_steps"] > 0
        # forks: n=4 seeded samples fork the prompt's KV (a partly filled page copied on every rank)
        params = SamplingParams(temperature=0.9, seed=3, n=4, max_tokens=6, ignore_eos=True)
        samples = [sorted(c.token_ids for c in o.outputs)
                   for llm in (one, two) for o in llm.generate([{"prompt_token_ids": PROMPTS[0]}], params,
                                                              use_tqdm=False)]
        assert samples[0] == samples[1]
    finally:
        two.engine.shutdown()
    assert all(p.poll() is not None for p in two.engine.worker.ranks.processes)


def test_fewer_kv_heads_than_ranks_then_a_killed_rank_is_named(tmp_path) -> None:
    model_dir = make_tiny_model(tmp_path / "qwen3-kv1", "qwen3", num_key_value_heads=1)
    llm = cpu_llm(str(model_dir), tensor_parallel_size=2)
    assert llm.engine.worker.model.shard.num_kv_heads == 1
    assert_matches_hf(model_dir, PROMPTS[:2], greedy(llm, PROMPTS[:2]))

    worker = llm.engine.worker
    rank1 = worker.ranks.processes[0]
    launch, steps = worker.launch, []

    def kill_on_third_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(rank1.pid, signal.SIGKILL)
        return launch(*args, **kwargs)

    worker.launch = kill_on_third_step
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 .*killed by signal SIGKILL"):
        greedy(llm, PROMPTS, max_tokens=30)
    assert time.monotonic() - start < 30
    assert all(p.poll() is not None for p in worker.ranks.processes), "a rank outlived the failure"
    with pytest.raises(RankFailure, match="rank 1"):  # the engine stays failed, it does not hang
        greedy(llm, PROMPTS[:1])


def test_sizes_the_model_cannot_split_are_refused_before_anything_starts(tiny_model_factory) -> None:
    model_dir = str(tiny_model_factory("llama"))  # 4 attention heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's 4 attention heads"):
        cpu_llm(model_dir, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        cpu_llm(model_dir, tensor_parallel_size=0)
