"""Async scheduling (step k+1 queued before step k's tokens are read) changes no output."""
from __future__ import annotations

import random

import pytest

from forkserve import SamplingParams
from forkserve.engine.in_flight import InFlightStep
from cpu_llm import cpu_llm


def _batch(vocab: int, max_model_len: int) -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(11)
    prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(2, 30))]} for _ in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 25)) for _ in range(4)]
    params += [SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randint(1, 25), logprobs=2) for i in range(4)]
    # A third of the vocabulary stops these: they end early, most of them after min_tokens.
    params += [SamplingParams(temperature=1.0, seed=seed, max_tokens=20, min_tokens=5,
                              stop_token_ids=list(range(3, vocab // 3))) for seed in range(4)]
    # max_tokens past the context is refused (as vLLM's server does): those run to the context's end instead
    params = [p.replace(max_tokens=None) if len(prompt["prompt_token_ids"]) + p.max_tokens > max_model_len else p
              for prompt, p in zip(prompts, params)]
    return prompts, params


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of each step that was queued ahead and resolved later (async scheduling at work)."""
    rows: list[int] = []
    resolve = InFlightStep.resolve

    def counting_resolve(self: InFlightStep, stops):  # noqa: ANN001
        rows.append(len(self.seqs))
        return resolve(self, stops)

    monkeypatch.setattr(InFlightStep, "resolve", counting_resolve)
    return rows


@pytest.mark.parametrize("pool", [2048, 40], ids=["roomy_pool", "preempting_pool"])
def test_async_scheduling_matches_sync(tiny_model_factory, launched: list[int], pool: int) -> None:
    model = str(tiny_model_factory("llama"))
    outputs = {}
    for async_scheduling in (False, True):
        llm = cpu_llm(model, num_gpu_blocks_override=pool, async_scheduling=async_scheduling,
                      reserve_output_kv=False, max_model_len=48)
        prompts, params = _batch(llm.engine.model_config.vocab_size, max_model_len=48)
        outputs[async_scheduling] = llm.generate(prompts, params, use_tqdm=False)
        if pool < 100:
            assert llm.engine.scheduler.num_preemptions > 0
    assert launched, "async scheduling never queued a step ahead"
    for sync_out, async_out in zip(outputs[False], outputs[True]):
        a, b = sync_out.outputs[0], async_out.outputs[0]
        assert (a.token_ids, a.finish_reason, a.stop_reason) == (b.token_ids, b.finish_reason, b.stop_reason)
        # Batches differ by the rows that finish a step later, so fp32 sums may differ in the last bits.
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or (), b.logprobs or ()):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 and x[t].rank == y[t].rank for t in x)
    assert any(o.outputs[0].finish_reason == "stop" for o in outputs[True])


def test_forked_samples_run_ahead(tiny_model_factory, launched: list[int]) -> None:
    """n > 1 forks at the first draw, which needs the tokens on the host: that step runs in sync.
    The forked samples then run ahead like any sequence, drawing the same tokens."""
    model = str(tiny_model_factory("llama"))
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": [9, 8, 7]}]
    outs = []
    for async_scheduling in (False, True):
        llm = cpu_llm(model, async_scheduling=async_scheduling)
        outs.append([[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.engine._in_flight is None
    assert outs[0] == outs[1]
    assert all(len(tokens) == 6 for request in outs[1] for tokens in request)
    assert launched and max(launched) == 6, f"forked samples never ran ahead: {launched}"
