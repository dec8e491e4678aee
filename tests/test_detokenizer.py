"""Incremental detokenisation: the same text as decoding in full, at a cost per step that does not
grow with the output (a streaming request's snapshots and stop-string checks)."""
from __future__ import annotations

import random
import statistics
import time

import pytest

from forkserve import SamplingParams
from forkserve.config import EngineConfig
from forkserve.detokenizer import IncrementalDetokenizer
from forkserve.engine.engine import Engine


def test_incremental_text_equals_the_full_decode(tiny_model_factory) -> None:
    """Random token streams, taken one to three tokens at a time, give at every point a prefix of
    the full decode and, at the end, all of it (special tokens skipped or kept)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_factory("llama")))
    rng = random.Random(0)
    for trial in range(20):
        skip = trial % 2 == 0
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 80))]
        detokenizer = IncrementalDetokenizer(tokenizer, skip)
        end = 0
        while end < len(ids):
            end = min(len(ids), end + rng.randint(1, 3))
            detokenizer.update(ids, 0, end)
            assert tokenizer.decode(ids[:end], skip_special_tokens=skip).startswith(detokenizer.text.rstrip("\ufffd"))
        detokenizer.update(ids, 0, len(ids))
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        assert detokenizer.text == full or (full.endswith("\ufffd") and full.startswith(detokenizer.text))


class CountingTokenizer:
    """The engine's tokenizer, counting the tokens each decode call is given."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, ids, **kwargs) -> str:  # noqa: ANN001
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.tokenizer, name)


@pytest.mark.slow
def test_a_2000_token_stream_costs_the_same_per_step_at_its_end_as_at_its_start(tiny_model_factory) -> None:
    """What a streaming server does each step (a snapshot of the request) plus a stop-string check
    per token: the tokens decoded per step stay bounded, and the snapshot's host time does not grow
    with the output (the whole output decoded each step would grow it ~100-fold here)."""
    engine = Engine(EngineConfig(str(tiny_model_factory("llama")), device="cpu", dtype="float32",
                                 num_gpu_blocks_override=512, max_model_len=2200))
    counting = engine.outputs.tokenizer = CountingTokenizer(engine.tokenizer)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=2000, ignore_eos=True, stop=["never-in-tiny-vocab"])
    engine.add_request("r", engine.make_prompt({"prompt_token_ids": [5, 6, 7, 8]}, "r"), params)
    decoded_per_step, snapshot_seconds = [], []
    final = None
    while engine.has_unfinished_requests():
        before = counting.decoded
        outputs = engine.step()
        start = time.perf_counter()
        snapshot = engine.peek_output("r")
        snapshot_seconds.append(time.perf_counter() - start)
        decoded_per_step.append(counting.decoded - before)
        if outputs:
            final = outputs[0]
        elif snapshot is not None:
            assert final is None
    assert final is not None and len(final.outputs[0].token_ids) == 2000
    assert max(decoded_per_step[:-1]) <= 32, "a step decoded far more than its new tokens"
    early, late = statistics.median(snapshot_seconds[50:250]), statistics.median(snapshot_seconds[-250:-50])
    assert late <= 3 * early + 50e-6, f"a snapshot took {late * 1e6:.0f} us at the end, {early * 1e6:.0f} us early on"
