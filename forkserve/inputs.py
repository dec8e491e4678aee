"""vLLM's prompt types (`vllm.inputs`): plain dicts, so `LLM.generate` takes them as it takes any dict."""
from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class TextPrompt(TypedDict):
    """A prompt as text, tokenized by the model's tokenizer."""

    prompt: str
    multi_modal_data: NotRequired[Any]  # refused: forkserve runs text models
    mm_processor_kwargs: NotRequired[dict[str, Any] | None]
    cache_salt: NotRequired[str]  # refused: the prefix cache is shared by every request


class TokensPrompt(TypedDict):
    """A prompt as token ids (the text, if given, is carried to the output unchanged)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    token_type_ids: NotRequired[list[int]]
    multi_modal_data: NotRequired[Any]
    mm_processor_kwargs: NotRequired[dict[str, Any] | None]
    cache_salt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt

__all__ = ["TextPrompt", "TokensPrompt", "PromptType"]
