"""HF transformers as the oracle: greedy generation, with the tie rule of the issue.

A comparison may stop early only at a step where HF's two best logits are within 1e-4 of each
other (a float-level tie that any two correct implementations may break differently). In fp16
and bf16 the rounding of two correct implementations differs far more, so their tie margins are
wider (HALF_TIE_EPS).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch

TIE_EPS = 1e-4
# Twice the largest log-prob gap measured between forkserve and HF on the tiny models in these
# dtypes (fp16 0.008, bf16 0.075): the logits of two correct implementations differ by that much.
HALF_TIE_EPS = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1}


def tie_eps(dtype: torch.dtype) -> float:
    return HALF_TIE_EPS.get(dtype, TIE_EPS)


@dataclass
class HFGreedy:
    tokens: list[int]
    tie_step: int | None  # first step whose top-2 logits were within TIE_EPS, if any


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int, dtype: torch.dtype = torch.float32,
              **generate_kwargs: Any) -> HFGreedy:
    """HF `generate` with greedy decoding; EOS ends it as it would end ours. `generate_kwargs`
    (penalties, logits processors) change the scores that greedy takes the argmax of, and the
    tie rule looks at those scores."""
    model = hf_model(str(model_dir), dtype)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=model.generation_config.eos_token_id,
                         **generate_kwargs)
    tokens = out.sequences[0, len(prompt):].tolist()
    tie_step = None
    for step, logits in enumerate(out.scores):
        top2 = torch.topk(logits[0].float(), 2).values
        if (top2[0] - top2[1]).item() < tie_eps(dtype):
            tie_step = step
            break
    return HFGreedy(tokens, tie_step)


def assert_matches_hf(model_dir: str, prompt: list[int], ours: list[int], max_new_tokens: int,
                      dtype: torch.dtype = torch.float32, **generate_kwargs: Any) -> None:
    """Token-for-token equality with HF (run in `dtype`), stopping early only at a logit tie (and saying so)."""
    ref = hf_greedy(model_dir, prompt, max_new_tokens, dtype, **generate_kwargs)
    if ref.tie_step is not None:
        warnings.warn(f"HF's top-2 logits tie within {tie_eps(dtype)} at step {ref.tie_step}: "
                      f"comparing only the first {ref.tie_step} tokens of prompt of length {len(prompt)}")
        assert ours[:ref.tie_step] == ref.tokens[:ref.tie_step]
    else:
        assert ours == ref.tokens, f"prompt {prompt[:8]}...: ours {ours} != HF {ref.tokens}"


@dataclass
class HFBeams:
    sequences: list[list[int]]  # generated tokens only, best first, padding cut
    scores: list[float]  # HF's sequences_scores (length-penalised)


@torch.inference_mode()
def hf_beam_search(model_dir: str, prompt: list[int], beam_width: int, max_new_tokens: int, length_penalty: float,
                   early_stopping: bool | str, eos_token_ids: list[int]) -> HFBeams:
    """HF `generate` with num_beams = beam_width, returning all beam_width hypotheses."""
    model = hf_model(str(model_dir))
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         num_beams=beam_width, num_return_sequences=beam_width, do_sample=False,
                         max_new_tokens=max_new_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                         eos_token_id=eos_token_ids or None, pad_token_id=-1, output_scores=True,
                         return_dict_in_generate=True)
    sequences = []
    for row in out.sequences[:, len(prompt):].tolist():
        if -1 in row:
            row = row[:row.index(-1)]
        sequences.append(row)
    return HFBeams(sequences, out.sequences_scores.tolist())


def assert_beams_match_hf(ours: list[list[int]], our_scores: list[float], ref: HFBeams) -> None:
    """Same hypotheses in the same order; past a rank where HF's scores tie within TIE_EPS, only
    the scores are compared (two hypotheses that tie may be ordered either way), and it says so."""
    assert len(ours) == len(ref.sequences)
    for rank, (mine, theirs) in enumerate(zip(ours, ref.sequences)):
        assert abs(our_scores[rank] - ref.scores[rank]) < TIE_EPS, f"rank {rank}: score {our_scores[rank]} != HF {ref.scores[rank]}"
        if mine != theirs:
            tied = [r for r in (rank - 1, rank + 1) if 0 <= r < len(ref.scores)
                    and abs(ref.scores[r] - ref.scores[rank]) < TIE_EPS]
            assert tied, f"rank {rank}: ours {mine} != HF {theirs} and HF's scores do not tie there"
            warnings.warn(f"HF's beam scores tie within {TIE_EPS} at rank {rank}: comparing only scores from there")
            for r in range(rank, len(ours)):
                assert abs(our_scores[r] - ref.scores[r]) < TIE_EPS
            return
