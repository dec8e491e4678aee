"""The sampler's general path (penalties, truncation, seeds, logprobs) on the CPU."""
from __future__ import annotations

import random

import torch

from forkserve.sampler import GENERAL_PATH_ROWS, Sampler, SamplingRow
from forkserve.sampling_params import SamplingParams


def test_general_path_draws_rows_alike_in_any_chunk() -> None:
    """A step with more rows than GENERAL_PATH_ROWS is drawn a chunk at a time (bounded memory):
    every seeded row's token, logprob, rank and top logprobs are what it gets drawn on its own,
    rows that asked for no logprobs get none, and greedy rows take their argmax."""
    rng = random.Random(0)
    rows = []
    for i in range(GENERAL_PATH_ROWS * 2 + 7):
        params = SamplingParams(temperature=0.0 if i % 5 == 0 else 0.9, top_p=rng.choice([1.0, 0.8]),
                                top_k=rng.choice([0, 20]), repetition_penalty=rng.choice([1.0, 1.2]),
                                logprobs=None if i < GENERAL_PATH_ROWS else rng.choice([0, 3]), seed=i)
        tokens = [rng.randrange(500) for _ in range(rng.randint(2, 9))]
        rows.append(SamplingRow(params, seed=i, token_ids=tokens, num_prompt_tokens=1))
    logits = torch.randn(len(rows), 500, generator=torch.Generator().manual_seed(0)) * 3
    together = Sampler(seed=0).draw(logits, rows).to_host()
    assert together.top_logprobs[0] is None and together.top_logprobs[-1] is not None
    for i in [0, 1, GENERAL_PATH_ROWS - 1, GENERAL_PATH_ROWS, GENERAL_PATH_ROWS + 1, len(rows) - 1]:
        alone = Sampler(seed=0).draw(logits[i:i + 1], rows[i:i + 1]).to_host()
        assert together.token_ids[i] == alone.token_ids[0]
        assert abs(together.logprobs[i] - alone.logprobs[0]) < 1e-5
        if rows[i].params.logprobs is not None:
            assert together.ranks[i] == alone.ranks[0]
            assert together.top_logprobs[i] == alone.top_logprobs[0]
        else:
            assert together.top_logprobs[i] is None
    greedy = [i for i, r in enumerate(rows) if r.params.greedy and r.params.repetition_penalty == 1.0]
    assert all(together.token_ids[i] == int(logits[i].argmax()) for i in greedy)
