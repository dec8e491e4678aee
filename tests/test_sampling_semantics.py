"""SamplingParams semantics on CPU, against HF transformers: penalties (greedy, token for token),
top-k / top-p / min-p (every drawn token inside the truncated distribution of HF's logits),
stop_token_ids and ignore_eos."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cpu_llm import cpu_llm
from forkserve import SamplingParams
from hf_oracle import assert_matches_hf, hf_model
from test_checkpoints import variant

MAX_NEW = 20


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


def random_prompts(vocab: int, lengths: tuple[int, ...]) -> list[list[int]]:
    rng = random.Random(9)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


class OutputPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, over generated tokens only (HF has neither)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        output = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


PENALTIES = {
    "repetition": dict(repetition_penalty=1.6),
    # A negative presence penalty invites repeats, so counts above 1 (where presence and frequency
    # part ways) occur.
    "presence_frequency": dict(presence_penalty=-1.0, frequency_penalty=0.6),
    "all_three": dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=1.5),
}


@pytest.mark.parametrize("name", list(PENALTIES))
def test_greedy_with_penalties_matches_hf(model_dir: str, name: str) -> None:
    penalties = PENALTIES[name]
    llm = cpu_llm(model_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    prompts = random_prompts(llm.engine.model_config.vocab_size, (4, 30))
    # A prompt ending in what the model says next: the repetition penalty must count prompt tokens.
    continued = llm.generate({"prompt_token_ids": prompts[0]}, greedy, use_tqdm=False)[0].outputs[0].token_ids
    prompts.append(prompts[0] + continued[:12])
    requests = [{"prompt_token_ids": p} for p in prompts]
    plain = llm.generate(requests, greedy, use_tqdm=False)
    outs = llm.generate(requests, greedy.replace(**penalties), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in plain]  # they bite
    for prompt, out in zip(prompts, outs):
        extra: dict[str, Any] = {"repetition_penalty": penalties.get("repetition_penalty", 1.0)}
        if "presence_penalty" in penalties:
            extra["logits_processor"] = LogitsProcessorList([OutputPenalties(
                len(prompt), penalties["presence_penalty"], penalties["frequency_penalty"])])
        assert_matches_hf(model_dir, prompt, out.outputs[0].token_ids, MAX_NEW, **extra)


def _allowed(probs: torch.Tensor, token: int, truncation: dict[str, float]) -> bool:
    """Whether `token` survives top-k, top-p and min-p of `probs` (with float slack at the edges)."""
    p = probs[token].item()
    ahead = probs > p + 1e-5
    if "top_k" in truncation and ahead.sum().item() >= truncation["top_k"]:
        return False
    if "top_p" in truncation and probs[ahead].sum().item() >= truncation["top_p"] + 1e-4:
        return False
    return not ("min_p" in truncation and p < truncation["min_p"] * probs.max().item() - 1e-5)


@pytest.mark.parametrize("truncation", [dict(top_k=4), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=6, min_p=0.1)],
                         ids=["top_k", "top_p", "min_p", "top_k_min_p"])
def test_drawn_tokens_stay_inside_the_truncated_distribution(model_dir: str, truncation: dict[str, float]) -> None:
    """HF's logits, teacher-forced on our samples and divided by the temperature, must allow every
    token drawn; the same draws without truncation leave that set, so the check has teeth."""
    temperature = 1.5
    llm = cpu_llm(model_dir)
    prompt = random_prompts(llm.engine.model_config.vocab_size, (11,))[0]
    base = SamplingParams(n=6, seed=1, temperature=temperature, max_tokens=12, ignore_eos=True)
    truncated, free = (llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
                       for params in (base.replace(**truncation), base))

    def verdicts(completions) -> list[bool]:
        found = []
        for completion in completions.outputs:
            tokens = completion.token_ids
            with torch.inference_mode():
                logits = hf_model(model_dir)(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            found += [_allowed(probs[step], token, truncation) for step, token in enumerate(tokens)]
        return found

    assert all(verdicts(truncated))
    assert not all(verdicts(free))


def test_stop_token_ids_and_ignore_eos(model_dir: str, tmp_path: Path) -> None:
    llm = cpu_llm(model_dir)
    prompt = {"prompt_token_ids": random_prompts(llm.engine.model_config.vocab_size, (9,))[0]}
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    k = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    assert llm.engine.stop_token_ids.isdisjoint(full[:k + 1])

    stopped = llm.generate(prompt, greedy.replace(ignore_eos=False, stop_token_ids=[full[k]]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == full[:k + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", full[k])

    # The same token made the model's EOS: it ends the output unless ignore_eos.
    eos_llm = cpu_llm(variant(Path(model_dir), tmp_path / "eos", eos_token_id=full[k]))
    ended = eos_llm.generate(prompt, greedy.replace(ignore_eos=False), use_tqdm=False)[0].outputs[0]
    assert ended.token_ids == full[:k + 1] and (ended.finish_reason, ended.stop_reason) == ("stop", None)
    ignored = eos_llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == full and ignored.finish_reason == "length"
