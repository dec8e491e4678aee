"""OpenAI response objects built from engine outputs (whole, streamed chunks, logprobs), apart from parsing requests."""

from __future__ import annotations

import math
from typing import Any

from forkserve.entrypoints.openai_protocol import CHAT, COMPLETIONS, OpenAIRequest
from forkserve.outputs import CompletionOutput, Logprob, RequestOutput

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    """Token counts; prompt_tokens_details.cached_tokens is what the prefix cache supplied."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def choice_index(request: OpenAIRequest, prompt_index: int, sample_index: int) -> int:
    """OpenAI numbers choices prompt by prompt: prompt i's samples are i*n .. i*n+n-1."""
    return prompt_index * request.params.n + sample_index


def prompt_logprobs_json(entries: list[dict[int, Logprob] | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs in JSON: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}}."""
    if entries is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entry.items()} for entry in entries]


def echo_prefix(request: OpenAIRequest, out: RequestOutput) -> str:
    """What `echo` puts before a choice's text: the prompt (completions) or, for chat, the last
    message's content when it has the response's role (vLLM's rule)."""
    if not request.echo:
        return ""
    if request.kind == COMPLETIONS:
        return out.prompt or ""
    last = request.prompts[0][-1]
    return last["content"] if last.get("role") == request.response_role else ""


def _echoed_logprobs(out: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
    """Completions logprobs with echo: the prompt's tokens (the first has none), then the output's."""
    prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    body = completion_logprobs(out.prompt_token_ids, [e or {} for e in prompt_entries])
    body["token_logprobs"][0], body["top_logprobs"][0] = None, None
    generated = completion_logprobs(c.token_ids, c.logprobs or [], sum(map(len, body["tokens"])))
    return {key: body[key] + generated[key] for key in body}


def completion_response(request: OpenAIRequest, request_id: str, model: str,
                        outputs: list[RequestOutput]) -> dict[str, Any]:
    choices = []
    for p, out in enumerate(outputs):
        for c in out.outputs:
            logprobs = None
            if request.params.logprobs is not None and c.logprobs is not None:
                logprobs = _echoed_logprobs(out, c) if request.echo else completion_logprobs(c.token_ids, c.logprobs)
            choice = {"index": choice_index(request, p, c.index), "text": echo_prefix(request, out) + c.text,
                      "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                      "prompt_logprobs": prompt_logprobs_json(out.prompt_logprobs)}
            if request.return_token_ids:
                choice.update(prompt_token_ids=list(out.prompt_token_ids), token_ids=list(c.token_ids))
            choices.append(choice)
    return {"id": request_id, "object": "text_completion", "created": request.created, "model": model,
            "choices": choices, "usage": usage(outputs)}


def chat_response(request: OpenAIRequest, request_id: str, model: str,
                  outputs: list[RequestOutput]) -> dict[str, Any]:
    choices = []
    for p, out in enumerate(outputs):
        for c in out.outputs:
            logprobs = None
            if request.params.logprobs is not None and c.logprobs is not None:
                logprobs = chat_logprobs(c.token_ids, c.logprobs, request.params.logprobs)
            choice = {"index": choice_index(request, p, c.index),
                      "message": {"role": request.response_role, "content": echo_prefix(request, out) + c.text},
                      "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if request.return_token_ids:
                choice["token_ids"] = list(c.token_ids)
            choices.append(choice)
    body = {"id": request_id, "object": "chat.completion", "created": request.created, "model": model,
            "choices": choices, "usage": usage(outputs), "prompt_logprobs": prompt_logprobs_json(outputs[0].prompt_logprobs)}
    if request.return_token_ids:
        body["prompt_token_ids"] = list(outputs[0].prompt_token_ids)
    return body


def response_body(request: OpenAIRequest, request_id: str, model: str, outputs: list[RequestOutput]) -> dict[str, Any]:
    build = chat_response if request.kind == CHAT else completion_response
    return build(request, request_id, model, outputs)


def completion_chunk(request: OpenAIRequest, request_id: str, model: str, index: int, text: str,
                     logprobs: dict | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": request.created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            **({"usage": None} if request.include_usage else {})}


def chat_chunk(request: OpenAIRequest, request_id: str, model: str, index: int, delta: dict[str, Any],
               logprobs: dict | None = None, finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": request.created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
            **({"usage": None} if request.include_usage else {})}


def usage_chunk(request: OpenAIRequest, request_id: str, model: str, outputs: list[RequestOutput]) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    obj = "chat.completion.chunk" if request.kind == CHAT else "text_completion"
    return {"id": request_id, "object": obj, "created": request.created, "model": model, "choices": [],
            "usage": usage(outputs)}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _LOGPROB_FLOOR


def _token_text(token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return f"token_id:{token_id}"


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]],
                        text_offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id)
        text = _token_text(token_id, chosen)
        tokens.append(text)
        token_logprobs.append(_finite(chosen.logprob) if chosen is not None else None)
        tops.append({_token_text(t, lp): _finite(lp.logprob) for t, lp in entry.items()})
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top: int) -> dict[str, Any]:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs: [...]}]."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id)
        text = _token_text(token_id, chosen)
        ranked = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top),
                        key=lambda item: item[1].rank)
        content.append({"token": text, "logprob": _finite(chosen.logprob) if chosen is not None else _LOGPROB_FLOOR,
                        "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": _token_text(t, lp), "logprob": _finite(lp.logprob),
                                          "bytes": list(_token_text(t, lp).encode("utf-8"))} for t, lp in ranked]})
    return {"content": content, "refusal": None}
