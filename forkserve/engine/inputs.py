"""Requests in: prompts validated and tokenized, sampling params checked against the engine's limits.

The front ends (`LLM`, the server, run-batch) call these before a request reaches the core,
which sees token ids only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from forkserve.sampling_params import ALL_LOGPROBS, SamplingParams, is_valid_text
from forkserve.structured.params import StructuredOutputsParams


@dataclass
class PromptInput:
    """A validated prompt: its token ids and, when given as text, the text."""

    token_ids: list[int]
    text: str | None = None


class InputProcessor:
    """Validates prompts (text or token ids) and sampling params; tokenizes text.

    `check_constraint` parses a request's structured-outputs constraint (a ValueError if it is bad).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, max_logprobs: int, max_n: int,
                 check_constraint: Callable[[StructuredOutputsParams], None]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.max_n = max_n
        self.check_constraint = check_constraint

    def make_prompt(self, prompt: object, label: str, truncate_prompt_tokens: int | None = None) -> PromptInput:
        """Validate one prompt (text, or vLLM's TextPrompt / TokensPrompt dict) and tokenize it;
        with truncate_prompt_tokens k, keep its last k tokens (-1: max_model_len), as vLLM does."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{label}: text prompts need a tokenizer (skip_tokenizer_init is set)")
            if not prompt:
                raise ValueError(f"{label}: prompt is empty")
            if not is_valid_text(prompt):
                raise ValueError(f"{label}: prompt is not valid Unicode (it holds a lone surrogate)")
            return self._check_tokens(self.tokenizer(prompt).input_ids, label, prompt, truncate_prompt_tokens)
        if isinstance(prompt, dict):
            _check_prompt_keys(prompt, label)
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not _all_ints(ids):
                    raise ValueError(f"{label}: prompt_token_ids must be a list of ints")
                return self._check_tokens(list(ids), label, prompt.get("prompt"), truncate_prompt_tokens)
            if "prompt" in prompt:
                return self.make_prompt(prompt["prompt"], label, truncate_prompt_tokens)
        raise ValueError(f"{label}: a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")

    def _check_tokens(self, ids: list[int], label: str, text: str | None,
                      truncate_prompt_tokens: int | None = None) -> PromptInput:
        if not ids:
            raise ValueError(f"{label}: prompt is empty")
        if truncate_prompt_tokens is not None:
            keep = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
            if keep < len(ids):
                ids, text = ids[-keep:], None  # the text no longer matches the tokens
        vocab = self.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise ValueError(f"{label}: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"{label}: prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} "
                             "(at least one token must be left to generate)")
        return PromptInput(ids, text)

    def check_params(self, params: object, label: str) -> SamplingParams:
        """The checks that need the model: logprob counts against max_logprobs, token ids against
        the vocabulary, widths against max_n, the structured-outputs constraint parsed."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"{label}: sampling params must be SamplingParams, got {type(params).__name__}")
        vocab = self.vocab_size
        limit = vocab if self.max_logprobs == ALL_LOGPROBS else self.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and (vocab if value == ALL_LOGPROBS else value) > limit:
                raise ValueError(f"{label}: {name}={value} exceeds max_logprobs={self.max_logprobs} "
                                 "(raise the engine's max_logprobs, -1 for the whole vocabulary)")
        checked = (("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids or ()),
                   ("logit_bias", params.logit_bias or ()))
        for name, ids in checked:
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{label}: invalid SamplingParams: {name} holds token id(s) {bad[:8]} outside "
                                 f"the vocabulary [0, {vocab})")
        if params.bad_words and self.tokenizer is None:
            raise ValueError(f"{label}: bad_words needs a tokenizer (skip_tokenizer_init is set)")
        for name in ("n", "best_of"):
            self.check_width(getattr(params, name), name, label)
        if params.structured_outputs is not None:
            try:
                self.check_constraint(params.structured_outputs)
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None
        return params

    def check_fits(self, prompt: PromptInput, params: SamplingParams, label: str) -> None:
        """max_tokens must fit beside the prompt in max_model_len (vLLM refuses it with a 400)."""
        if params.max_tokens is not None and len(prompt.token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"{label}: invalid SamplingParams: max_tokens={params.max_tokens} is too large: this "
                             f"model's maximum context length (max_model_len) is {self.max_model_len} tokens and the "
                             f"prompt has {len(prompt.token_ids)}, so at most "
                             f"{self.max_model_len - len(prompt.token_ids)} tokens can be generated")

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """vLLM's tokenization of bad words: each word as it starts a text, and with a leading space
        when that tokenizes to a different first token in the same number of tokens."""
        sequences: list[list[int]] = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            sequences.append(plain)
            if spaced and plain and spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        return [ids for ids in sequences if ids]

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


_PROMPT_KEYS = {"prompt", "prompt_token_ids", "token_type_ids", "multi_modal_data", "mm_processor_kwargs", "cache_salt"}


def _check_prompt_keys(prompt: dict, label: str) -> None:
    """vLLM's TextPrompt / TokensPrompt keys: the text-model ones taken, the others refused by name."""
    unknown = sorted(set(prompt) - _PROMPT_KEYS)
    if unknown:
        raise ValueError(f"{label}: unknown prompt key(s) {unknown}; expected 'prompt' or 'prompt_token_ids'")
    if prompt.get("multi_modal_data") is not None or prompt.get("mm_processor_kwargs"):
        raise ValueError(f"{label}: multi_modal_data is not supported: forkserve runs text-only models")
    if prompt.get("cache_salt") is not None:
        raise ValueError(f"{label}: cache_salt is not supported yet: every request shares the prefix cache; "
                         "run isolated tenants on separate engines")


def check_local_model(model: str) -> None:
    """forkserve loads local checkpoint directories only: a hub id ("org/name", no such directory)
    gets told how to get one."""
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_hub_id and not Path(model).exists():
        raise ValueError(f"model {model!r} is not a local directory: forkserve loads local checkpoints only and "
                         "downloads nothing; download it first (e.g. `huggingface-cli download "
                         f"{model} --local-dir DIR`) and pass DIR")


def load_tokenizer(path: str):
    """The checkpoint's own tokenizer files; never remote code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {path} (tokenizer.json or tokenizer_config.json with its "
                         f"vocabulary files expected there; pass skip_tokenizer_init=True to run on token ids): "
                         f"{error}") from error
