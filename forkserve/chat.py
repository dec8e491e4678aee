"""Chat messages to prompt text through the tokenizer's chat template, as vLLM's `LLM.chat` and its
server render them (one helper for both, so the same conversation gives the same tokens)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

_RESERVED_TEMPLATE_KWARGS = ("tokenize", "return_dict", "return_tensors", "chat_template", "conversation")


def load_chat_template(template: str | None) -> str | None:
    """A Jinja template given inline or as a file path (vLLM's --chat-template takes both)."""
    if template is None:
        return None
    path = Path(template)
    if len(template) < 4096 and "{" not in template and path.is_file():
        return path.read_text()
    return template


def message_content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts joined by newlines (vLLM's "string"
    content format); other parts are refused, forkserve runs text models."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                                 "supported: forkserve runs text-only models")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"{where}.content must be a string or a list of text parts, got {type(content).__name__}")


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], label: str, *, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt text of one conversation. Raises ValueError naming what is wrong (the template's
    own errors, e.g. a role order it refuses, included)."""
    if add_generation_prompt and continue_final_message:
        raise ValueError(f"{label}: continue_final_message and add_generation_prompt cannot both be true "
                         "(pass add_generation_prompt=False to continue the last message)")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{label}: messages must be a non-empty list of {{'role', 'content'}} dicts")
    conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or \
                (message.get("content") is None and message["role"] != "assistant"):
            raise ValueError(f"{label}: messages[{i}] must be a dict with 'role' and 'content' (only an "
                             "assistant message may have no content)")
        conversation.append({**message, "content": message_content(message.get("content"), f"messages[{i}]")})
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(set(extra) & set(_RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ValueError(f"{label}: chat_template_kwargs may not set {', '.join(reserved)}")
    settings = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                **extra}
    try:
        return tokenizer.apply_chat_template(conversation, chat_template=load_chat_template(chat_template),
                                             tokenize=False, **settings)
    except Exception as err:  # jinja errors (e.g. raise_exception on a role order), HF's own checks
        raise ValueError(f"{label}: the chat template failed: {err}") from None
