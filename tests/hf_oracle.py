"""HF transformers as the oracle: greedy generation, with the tie rule of the issue.

A comparison may stop early only at a step where HF's two best logits are within 1e-4 of each
other (a float-level tie that any two correct implementations may break differently).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

TIE_EPS = 1e-4


@dataclass
class HFGreedy:
    tokens: list[int]
    tie_step: int | None  # first step whose top-2 logits were within TIE_EPS, if any


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int) -> HFGreedy:
    """HF `generate` with greedy decoding; EOS ends it as it would end ours."""
    model = hf_model(str(model_dir))
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=model.generation_config.eos_token_id)
    tokens = out.sequences[0, len(prompt):].tolist()
    tie_step = None
    for step, logits in enumerate(out.logits):
        top2 = torch.topk(logits[0].float(), 2).values
        if (top2[0] - top2[1]).item() < TIE_EPS:
            tie_step = step
            break
    return HFGreedy(tokens, tie_step)


def assert_matches_hf(model_dir: str, prompt: list[int], ours: list[int], max_new_tokens: int) -> None:
    """Token-for-token equality with HF, stopping early only at a logit tie (and saying so)."""
    ref = hf_greedy(model_dir, prompt, max_new_tokens)
    if ref.tie_step is not None:
        warnings.warn(f"HF's top-2 logits tie within {TIE_EPS} at step {ref.tie_step}: "
                      f"comparing only the first {ref.tie_step} tokens of prompt of length {len(prompt)}")
        assert ours[:ref.tie_step] == ref.tokens[:ref.tie_step]
    else:
        assert ours == ref.tokens, f"prompt {prompt[:8]}...: ours {ours} != HF {ref.tokens}"
