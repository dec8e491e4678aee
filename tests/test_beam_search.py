"""Beam search equals HF transformers' (num_beams = beam_width) on fp32 tiny checkpoints."""
from __future__ import annotations

import collections
import json
import random
import shutil
from pathlib import Path

import pytest

from cpu_llm import PAGE, cpu_llm
from forkserve import LLM, BeamSearchOutput, BeamSearchParams, SamplingParams
from hf_oracle import assert_beams_match_hf, hf_beam_search

CASES = [  # beam_width, max_tokens, length_penalty, early_stopping
    (3, 12, 1.0, False),
    (4, 10, 0.5, True),
    (2, 9, 2.0, "never"),
    (5, 8, -0.5, False),
    (3, 24, 1.0, False),  # long enough for HF's early-stop heuristic to end the search
    (3, 12, 1.0, True),  # differs from the first case: True stops as soon as 3 hypotheses are done
    (4, 12, 1.0, "never"),  # differs from False on qwen2: the bound uses max_tokens, so it searches on
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def eos_model(request, tiny_model_factory, tmp_path_factory) -> str:
    """The tiny checkpoint with the tokens it predicts most made extra EOS tokens, so hypotheses end early."""
    source = Path(tiny_model_factory(request.param))
    target = tmp_path_factory.mktemp(f"beam-{request.param}")
    shutil.copytree(source, target, dirs_exist_ok=True)
    llm = cpu_llm(str(source))
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 300) for _ in range(8)]} for _ in range(6)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    frequent = collections.Counter(t for o in outs for t in o.outputs[0].token_ids).most_common(3)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((target / name).read_text())
        config["eos_token_id"] = sorted({config["eos_token_id"]} | {token for token, _ in frequent})
        (target / name).write_text(json.dumps(config))
    return str(target)


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, vocab) for _ in range(9)]
    return [[rng.randrange(3, vocab) for _ in range(5)], shared + [rng.randrange(3, vocab) for _ in range(14)],
            shared + [rng.randrange(3, vocab) for _ in range(3)]]


def _check(llm: LLM, model_dir: str, outputs: list[BeamSearchOutput], prompts: list[list[int]],
           params: BeamSearchParams) -> int:
    """Compare with HF; returns how many hypotheses ended with EOS (so the test knows it exercised that)."""
    width = params.beam_width
    eos = [] if params.ignore_eos else sorted(llm.engine.stop_token_ids)  # HF with no EOS: ignore_eos
    ended = 0
    for prompt, output in zip(prompts, outputs):
        assert len(output.sequences) == width
        ref = hf_beam_search(model_dir, prompt, width, params.max_tokens, params.length_penalty,
                             params.early_stopping, eos)
        for hyp in output.sequences:
            assert hyp.tokens[:len(prompt)] == prompt
            assert hyp.text == llm.get_tokenizer().decode(hyp.tokens)
            ended += hyp.finish_reason == "stop"
        assert_beams_match_hf([h.tokens[len(prompt):] for h in output.sequences],
                              [h.score for h in output.sequences], ref)
    return ended


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"w{c[0]}-t{c[1]}-lp{c[2]}-es{c[3]}")
def test_beam_search_matches_hf(eos_model: str, case: tuple) -> None:
    width, max_tokens, length_penalty, early_stopping = case
    llm = cpu_llm(eos_model)
    prompts = _prompts(llm.engine.model_config.vocab_size)
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    ended = _check(llm, eos_model, outputs, prompts, params)
    if case == CASES[0]:
        assert ended > 0, "no hypothesis ended with EOS: the frequent-EOS checkpoint did not do its job"
    for hyp in outputs[0].sequences:
        assert hyp.cum_logprob == pytest.approx(hyp.score * (len(hyp.tokens) - len(prompts[0])) ** length_penalty)
    engine = llm.engine
    assert engine.pages_in_use == 0  # every beam released
    engine.tree.check_invariants()
    # Beams share the prompt: it is prefilled once per prompt, however wide the beam.
    assert engine.stats()["prefill_tokens_computed"] == sum(len(p) for p in prompts)


def test_beam_search_on_a_tiny_pool(eos_model: str) -> None:
    params = BeamSearchParams(beam_width=4, max_tokens=12)
    llm = cpu_llm(eos_model, num_gpu_blocks_override=12,
              max_model_len=40)
    prompts = _prompts(llm.engine.model_config.vocab_size)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.engine.scheduler.num_preemptions > 0 or llm.engine.stats()["prefill_tokens_computed"] > \
        sum(len(p) for p in prompts), "the pool was large enough: this test would not test anything"
    _check(llm, eos_model, outputs, prompts, params)
    llm.engine.tree.check_invariants()


def test_beams_share_pages(eos_model: str) -> None:
    llm = cpu_llm(eos_model)
    prompt = _prompts(llm.engine.model_config.vocab_size)[1]
    width, new = 6, 16
    llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=width, max_tokens=new,
                                                                     ignore_eos=True))
    # Shared prompt + per beam its own pages of history it does not share + one partial copy.
    assert llm.engine.stats()["peak_pages_in_use"] <= -(-len(prompt) // PAGE) + width * (-(-new // PAGE) + 1)


def test_ignore_eos_matches_hf_without_eos(eos_model: str) -> None:
    """ignore_eos: EOS tokens are ordinary tokens, so every hypothesis runs to max_tokens, as in HF's
    search with no EOS token (on the frequent-EOS checkpoint, honouring EOS would end some early)."""
    llm = cpu_llm(eos_model)
    prompts = _prompts(llm.engine.model_config.vocab_size)
    params = BeamSearchParams(beam_width=3, max_tokens=10, ignore_eos=True)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    assert _check(llm, eos_model, outputs, prompts, params) == 0
    assert all(len(h.tokens) == len(p) + 10 for p, o in zip(prompts, outputs) for h in o.sequences)
