"""Requests in: prompts validated and tokenized, sampling params checked against the engine's limits.

The front ends (`LLM`, the server, run-batch) call these before a request reaches the core,
which sees token ids only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forkserve.sampling_params import SamplingParams


@dataclass
class PromptInput:
    """A validated prompt: its token ids and, when given as text, the text."""

    token_ids: list[int]
    text: str | None = None


class InputProcessor:
    """Validates prompts (text or token ids) and sampling params; tokenizes text."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, max_logprobs: int, max_n: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.max_n = max_n

    def make_prompt(self, prompt: object, label: str) -> PromptInput:
        """Validate one prompt (text or {'prompt_token_ids': [...]}) and tokenize it."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{label}: text prompts need a tokenizer (skip_tokenizer_init is set)")
            if not prompt:
                raise ValueError(f"{label}: prompt is empty")
            return self._check_tokens(self.tokenizer(prompt).input_ids, label, prompt)
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
            if unknown:
                raise ValueError(f"{label}: unknown prompt key(s) {unknown}; expected 'prompt' or 'prompt_token_ids'")
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not _all_ints(ids):
                    raise ValueError(f"{label}: prompt_token_ids must be a list of ints")
                return self._check_tokens(list(ids), label, prompt.get("prompt"))
            if "prompt" in prompt:
                return self.make_prompt(prompt["prompt"], label)
        raise ValueError(f"{label}: a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")

    def _check_tokens(self, ids: list[int], label: str, text: str | None) -> PromptInput:
        if not ids:
            raise ValueError(f"{label}: prompt is empty")
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise ValueError(f"{label}: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{label}: prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                             "(at least one token must be left to generate)")
        return PromptInput(ids, text)

    def check_params(self, params: object, label: str) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{label}: sampling params must be SamplingParams, got {type(params).__name__}")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"{label}: logprobs={params.logprobs} exceeds max_logprobs={self.max_logprobs}")
        for name in ("n", "best_of"):
            self.check_width(getattr(params, name), name, label)
        return params

    def check_width(self, value: int | None, name: str, label: str) -> None:
        """Samples, beams and fork widths are capped by max_n (each one is a sequence to run)."""
        if value is not None and value > self.max_n:
            raise ValueError(f"{label}: {name}={value} exceeds max_n={self.max_n}")


def _all_ints(ids: list | tuple) -> bool:
    """Every element an int and none a bool. Checked by type in C first: a batch of long prompts
    (millions of ids) is validated before the first step, while the GPU waits."""
    if set(map(type, ids)) <= {int}:
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer files; never remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {path} (tokenizer.json or tokenizer_config.json with its "
                         f"vocabulary files expected there; pass skip_tokenizer_init=True to run on token ids): "
                         f"{error}") from error
