"""The sampler's general path (penalties, truncation, seeds, logprobs) on the CPU."""
from __future__ import annotations

import random

import pytest
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


def test_top_p_counts_the_mass_top_k_kept() -> None:
    """vLLM's order (and FlashInfer's kernels'): top-k first, then top-p over the renormalised
    top-k mass. Of probabilities 0.5, 0.3, 0.2 with top_k=2 the kept mass is 0.8, so top_p=0.6
    stops after the first token (0.5 >= 0.6 x 0.8); over the full mass it would keep two."""
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    kept = Sampler._top_k_top_p(probs, [SamplingParams(top_k=2, top_p=0.6)])
    assert (kept > 0).tolist() == [[True, False, False]]
    assert (Sampler._top_k_top_p(probs, [SamplingParams(top_p=0.6)]) > 0).tolist() == [[True, True, False]]


class _StandInKernels:
    """Takes the place of forkserve.kernels.truncated_sampling on the CPU: records its rows and
    draws the argmax, so the test sees which rows the sampler routed to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def sample(self, logits, temperatures, top_k, top_p, generator):
        self.calls.append((logits, temperatures, top_k, top_p))
        return logits.argmax(dim=-1), torch.log_softmax(logits, dim=-1).amax(dim=-1)


def test_unseeded_truncated_rows_go_to_the_gpu_kernels_and_merge_back(monkeypatch) -> None:
    """Unseeded top-k / top-p rows without logprobs are drawn by the truncated-sampling kernels
    (top_k clamped to the vocabulary, off = the vocabulary); seeded rows, rows asking logprobs and
    penalised rows stay on the general path, and every row's draw lands in its own place."""
    import forkserve.sampler as sampler_module

    stand_in = _StandInKernels()
    monkeypatch.setattr(sampler_module, "gpu_kernels", lambda name, x: stand_in if name == "truncated_sampling" else None)
    vocab = 50
    truncated = SamplingParams(temperature=0.7, top_p=0.95, top_k=40)
    params = [truncated, truncated.replace(seed=3), truncated.replace(top_k=2 ** 63 - 1), truncated.replace(logprobs=2),
              SamplingParams(temperature=0.9), truncated.replace(repetition_penalty=1.3)]
    rows = [SamplingRow(p, p.seed, [1, 2, 3], 1) for p in params]
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(1)) * 4
    draws = Sampler(seed=0).draw(logits, rows).to_host()
    (fast_logits, temperatures, top_k, top_p), = stand_in.calls
    assert torch.equal(fast_logits, logits[[0, 2, 4]])
    assert top_k.tolist() == [40, vocab, vocab] and temperatures.tolist() == pytest.approx([0.7, 0.7, 0.9])
    assert top_p.tolist() == pytest.approx([0.95, 0.95, 1.0])
    for fast_row in (0, 2, 4):
        assert draws.token_ids[fast_row] == logits[fast_row].argmax().item()
    alone = Sampler(seed=0).draw(logits[[1]], rows[1:2]).to_host()  # seeded: the hash, wherever it sits
    assert draws.token_ids[1] == alone.token_ids[0]
    assert draws.top_logprobs[3] is not None and len(draws.top_logprobs[3]) == 2
    assert draws.top_logprobs[0] is None and draws.ranks[0] == 0
    stand_in.calls.clear()
    Sampler(seed=0, flashinfer_sampling=False).draw(logits, rows)
    assert not stand_in.calls
