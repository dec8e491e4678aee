"""Logits computed for row counts padded up to sizes run once at start-up (on a GPU, where
cuBLAS's first run of a kernel waits for the GPU to drain), here on CPU with the sizes given."""
from __future__ import annotations

import random

import pytest
import torch

from forkserve import LLM, SamplingParams


def test_logits_for_padded_row_counts_are_the_rows_asked_for(tiny_model_factory) -> None:
    """On a GPU the runner computes logits for a row count padded up to a warmed size; the rows
    it returns are those asked for, whether it slices leading rows or gathers scattered ones."""
    llm = LLM(str(tiny_model_factory("llama")), device="cpu", dtype="float32", seed=0)
    prompts = [{"prompt_token_ids": [random.Random(i).randrange(3, 200) for _ in range(5 + 7 * i)]} for i in range(5)]
    params = SamplingParams(temperature=0.8, max_tokens=12, logprobs=3, seed=7)
    plain = llm.generate(prompts, params, use_tqdm=False)
    runner = llm.engine.worker.runner
    runner.logits_sizes = [2, 8, 16]
    padded = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in padded] == [o.outputs[0].token_ids for o in plain]
    for a, b in zip(padded, plain):  # the same up to the GEMM's rounding at another row count
        for entry, expected in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert entry.keys() == expected.keys()
            assert [e.logprob for e in entry.values()] == pytest.approx([e.logprob for e in expected.values()],
                                                                        rel=1e-5, abs=1e-5)
    hidden = torch.randn(11, runner.model.config.hidden_size)
    for last in ([0, 1, 2], [1, 4, 10], list(range(11))):
        torch.testing.assert_close(runner._logits(hidden, last), runner.model.compute_logits(hidden[last]))
