"""OpenAI's completion and chat-completion protocol: request bodies in, response objects out.

One module for the server and the batch runner, so that both accept the same fields, reject the
same mistakes with the same messages, and answer with the same objects.

- `parse_request(kind, body)` checks a body's fields and maps them onto `SamplingParams`
  (value errors are SamplingParams' own messages; `OpenAIError.param` names the body field).
- `make_prompts(request, tokenizer, engine)` tokenizes (applying the chat template for chat) and
  validates each prompt against the engine (vocabulary, max_model_len).
- `error_body` builds the error object; the response objects are built in openai_responses.py
  (`completion_response` / `chat_response`, `completion_chunk` / `chat_chunk` / `usage_chunk`).
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from forkserve.chat import message_content, render_chat
from forkserve.engine.engine import PromptInput
from forkserve.sampling_params import BeamSearchParams, SamplingParams, is_valid_text, shown
from forkserve.structured.params import CONSTRAINTS, StructuredOutputsParams

COMPLETIONS = "completion"
CHAT = "chat"
URLS = {"/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT}

# Body fields that map one-to-one onto SamplingParams (OpenAI's, then vLLM's extras).
SAMPLING_FIELDS = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty",
                   "top_k", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "stop_token_ids",
                   "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
                   "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "prompt_logprobs")
# Body fields that constrain the output (structured outputs): OpenAI's, vLLM's, vLLM's older aliases.
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
STRUCTURED_FIELDS = ("response_format", "structured_outputs", *GUIDED_FIELDS)
_COMMON_FIELDS = {"model", "max_tokens", "logprobs", "stream", "stream_options", "user", "logit_bias", "echo",
                  "return_token_ids", "use_beam_search", "length_penalty", *SAMPLING_FIELDS, *STRUCTURED_FIELDS}
COMPLETION_FIELDS = frozenset(_COMMON_FIELDS | {"prompt", "suffix", "best_of"})
CHAT_FIELDS = frozenset(_COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                                          "tool_choice", "add_generation_prompt", "continue_final_message",
                                          "chat_template", "chat_template_kwargs"})
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias; vLLM clamps to it
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat has no limit
MAX_PROMPTS = 2048  # prompts in one completion body (OpenAI's limit for arrays of inputs)

_SAMPLING_ERROR = re.compile(r"^invalid SamplingParams: (\w+) ")
# "request: logprobs=30 exceeds ..." or "request: invalid SamplingParams: stop_token_ids holds ..."
_ENGINE_PARAM_ERROR = re.compile(r"^request: (?:invalid SamplingParams: )?(\w+)")


class OpenAIError(ValueError):
    """A request the server refuses, with the fields of OpenAI's error object and an HTTP status."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class OpenAIRequest:
    """A checked request body: what to run and how to answer."""

    kind: str  # COMPLETIONS or CHAT
    params: SamplingParams
    prompts: list[Any]  # completions: str or token-id lists; chat: one list of messages
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    structured_param: str | None = None  # the body field its structured outputs came from
    created: int = field(default_factory=lambda: int(time.time()))
    # SamplingParams field -> the body field it came from (chat's logprobs come from top_logprobs)
    source: dict[str, str] = field(default_factory=dict)
    echo: bool = False  # completions: the prompt before the text; chat: the last message's content, same role
    return_token_ids: bool = False  # vLLM's: prompt_token_ids and token_ids in the response
    chat_options: dict[str, Any] = field(default_factory=dict)  # render_chat's keyword arguments
    response_role: str = "assistant"
    max_tokens_param: str = "max_tokens"  # the body field max_tokens came from (chat: or max_completion_tokens)
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage so far in every chunk
    use_beam_search: bool = False  # vLLM's: beam search with beam_width n, the n best hypotheses as choices
    length_penalty: float = 1.0

    def beam_search_params(self, prompt: PromptInput, max_model_len: int) -> BeamSearchParams:
        """vLLM's mapping of a use_beam_search body: beam_width = n; max_tokens defaults to the rest
        of the context."""
        p = self.params
        max_tokens = p.max_tokens if p.max_tokens is not None else max_model_len - len(prompt.token_ids)
        return BeamSearchParams(beam_width=p.n, max_tokens=max_tokens, ignore_eos=p.ignore_eos,
                                temperature=p.temperature, length_penalty=self.length_penalty,
                                include_stop_str_in_output=p.include_stop_str_in_output)

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == CHAT else "prompt"


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex


# ------------------------------------------------------------------------------------ requests
def parse_request(kind: str, body: Any, defaults: dict[str, Any] | None = None) -> OpenAIRequest:
    """Check a completion (`kind` COMPLETIONS) or chat (CHAT) body; raise OpenAIError naming the field.
    `defaults`: SamplingParams fields for what the body leaves out (the model's generation config,
    as vLLM's server applies it; its max_tokens aside, the body's protocol defaults rule there)."""
    if not isinstance(body, dict):
        raise OpenAIError(f"the request body must be a JSON object, got {_json_type(body)}")
    allowed = CHAT_FIELDS if kind == CHAT else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise OpenAIError(f"unknown field(s) {', '.join(repr(u) for u in unknown)}", unknown[0], code="unknown_field")
    for name in ("model", "user"):
        _optional_text(body, name)
    stream = _optional_bool(body, "stream") or False
    include_usage = continuous_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise OpenAIError("stream_options can only be given with stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise OpenAIError("stream_options must be an object with only 'include_usage' and "
                              "'continuous_usage_stats'", "stream_options")
        include_usage = bool(_optional_bool(options, "include_usage", "stream_options.include_usage"))
        continuous_usage = bool(_optional_bool(options, "continuous_usage_stats",
                                               "stream_options.continuous_usage_stats"))
    use_beam_search = bool(_optional_bool(body, "use_beam_search"))
    if use_beam_search and stream:
        raise OpenAIError("use_beam_search cannot stream yet: send stream: false", "use_beam_search",
                          code="unsupported")
    length_penalty = body.get("length_penalty", 1.0)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or \
            not math.isfinite(length_penalty):
        raise OpenAIError(f"length_penalty must be a finite number, got {length_penalty!r}", "length_penalty")
    echo = bool(_optional_bool(body, "echo"))
    if stream and body.get("prompt_logprobs") is not None:
        raise OpenAIError("prompt_logprobs are not available when stream is true", "prompt_logprobs")
    return_token_ids = bool(_optional_bool(body, "return_token_ids"))

    values: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if k != "max_tokens"}
    source: dict[str, str] = {}  # SamplingParams field -> the body field it came from
    for name in SAMPLING_FIELDS:
        if body.get(name) is not None:
            values[name], source[name] = body[name], name
    if body.get("logit_bias") is not None:
        values["logit_bias"], source["logit_bias"] = _logit_bias(body["logit_bias"]), "logit_bias"
    chat_options: dict[str, Any] = {}
    if kind == CHAT:
        prompts = [_check_messages(body.get("messages"))]
        _check_chat_extras(body)
        chat_options = _chat_options(body)
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        values["max_tokens"], source["max_tokens"] = body.get(limit), limit
        if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
            raise OpenAIError(f"logprobs must be true or false, got {shown(body['logprobs'])}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not body.get("logprobs"):
            raise OpenAIError("top_logprobs needs logprobs: true", "top_logprobs")
        if body.get("logprobs"):
            values["logprobs"], source["logprobs"] = (0 if top is None else top), "top_logprobs"
    else:
        prompts = _completion_prompts(body.get("prompt"))
        if body.get("suffix") is not None:
            raise OpenAIError("suffix is not supported", "suffix", code="unsupported")
        best_of = body.get("best_of")
        if best_of is not None and not _is_int(best_of):
            raise OpenAIError(f"best_of must be an integer, got {shown(best_of)}", "best_of")
        if best_of is not None and best_of != body.get("n", 1):
            raise OpenAIError("best_of other than n is not supported", "best_of", code="unsupported")
        max_tokens = body.get("max_tokens", COMPLETION_DEFAULT_MAX_TOKENS)
        values["max_tokens"], source["max_tokens"] = max_tokens, "max_tokens"
        if body.get("logprobs") is not None:
            values["logprobs"], source["logprobs"] = body["logprobs"], "logprobs"
            if echo and "prompt_logprobs" not in values:  # echoed prompt tokens carry logprobs too (vLLM)
                values["prompt_logprobs"], source["prompt_logprobs"] = body["logprobs"], "logprobs"
    structured_param, values["structured_outputs"] = _structured_outputs(body)
    try:
        params = SamplingParams(**values)
    except ValueError as err:
        match = _SAMPLING_ERROR.match(str(err))
        name = match.group(1) if match else None
        param = source.get(name, name) if name else None
        message = str(err)
        if name and param != name:  # say it as the body said it (max_completion_tokens, top_logprobs)
            message = message.replace(f"SamplingParams: {name} ", f"SamplingParams: {param} ", 1)
        raise OpenAIError(message, param) from None
    return OpenAIRequest(kind, params, prompts, body.get("model"), stream, include_usage, echo=echo,
                         return_token_ids=return_token_ids, chat_options=chat_options,
                         use_beam_search=use_beam_search, length_penalty=float(length_penalty),
                         continuous_usage=include_usage and continuous_usage,
                         max_tokens_param=source.get("max_tokens", "max_tokens"),
                         structured_param=structured_param, source=source)


def _structured_outputs(body: dict) -> tuple[str | None, StructuredOutputsParams | None]:
    """(the body field, its constraint) from response_format, a guided_* alias or vLLM's
    structured_outputs object; the latter may also carry only options (disable_any_whitespace)
    for the constraint that response_format or an alias gives, as in vLLM."""
    given = [name for name in ("response_format", *GUIDED_FIELDS)
             if body.get(name) is not None and body[name] != {"type": "text"}]
    options = body.get("structured_outputs")
    if len(given) > 1 or (given and isinstance(options, dict) and set(options) & set(CONSTRAINTS)):
        names = given + (["structured_outputs"] if options is not None else [])
        raise OpenAIError(f"give one of {', '.join(names)}, not several", names[1])
    if not given and options is None:
        return None, None
    name = given[0] if given else "structured_outputs"
    try:
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"structured_outputs must be an object, got {_json_type(options)}")
        values = dict(options or {})
        if name in GUIDED_FIELDS:
            values[GUIDED_FIELDS[name]] = body[name]
        elif name == "response_format":
            values.update(_response_format(body[name]))
        return name, StructuredOutputsParams.from_dict(values)
    except ValueError as err:
        raise OpenAIError(str(err), name) from None


def _response_format(value: Any) -> dict[str, Any]:
    """OpenAI's response_format as a StructuredOutputsParams field: {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} or {"type": "json_object"} ({"type": "text"}
    constrains nothing and is handled by the caller)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object" and set(value) == {"type"}:
        return {"json_object": True}
    if kind == "json_schema" and set(value) == {"type", "json_schema"} and isinstance(value["json_schema"], dict):
        spec = value["json_schema"]
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise ValueError(f"response_format.json_schema: unknown field(s) {', '.join(unknown)}")
        if not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return {"json": spec["schema"]}
    raise ValueError("response_format must be {'type': 'text'}, {'type': 'json_object'} or "
                     f"{{'type': 'json_schema', 'json_schema': {{'name', 'schema', 'strict'}}}}, got {value!r}")


def _logit_bias(bias: Any) -> dict[int, float]:
    """OpenAI's logit_bias: token id (a string key in JSON) -> bias, clamped to [-100, 100] as vLLM does."""
    if not isinstance(bias, dict):
        raise OpenAIError(f"logit_bias must be an object of token id -> bias, got {_json_type(bias)}", "logit_bias")
    clamped = {}
    for token, value in bias.items():
        try:
            token_id = int(token)
        except (TypeError, ValueError):
            raise OpenAIError(f"logit_bias keys must be token ids, got {token!r}", "logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OpenAIError(f"logit_bias values must be finite numbers, got {value!r}", "logit_bias")
        clamped[token_id] = max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(value)))
    return clamped


def _chat_options(body: dict) -> dict[str, Any]:
    """vLLM's chat-template fields of a chat body, as `render_chat` takes them."""
    options: dict[str, Any] = {}
    for name in ("add_generation_prompt", "continue_final_message"):
        if _optional_bool(body, name) is not None:
            options[name] = body[name]
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise OpenAIError("chat_template_kwargs must be an object", "chat_template_kwargs")
        options["chat_template_kwargs"] = kwargs
    template = body.get("chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise OpenAIError("chat_template must be a string", "chat_template")
        options["chat_template"] = template
    return options


def parse_json(data: bytes | bytearray, what: str = "the request body") -> Any:
    """JSON as Python reads it (NaN and Infinity included: the fields' checks refuse them by name).
    Text that does not parse, nests deeper than Python recurses, or holds an integer too long to
    convert raises OpenAIError (the last is a ValueError, the nesting a RecursionError)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise OpenAIError(f"{what} is not valid JSON: {shown(str(err))}", None, code="invalid_json") from None


def check_model(request: OpenAIRequest, served: list[str]) -> None:
    """A named model must be one this process serves (an absent name means the first)."""
    if request.model is not None and request.model not in served:
        raise OpenAIError(f"the model {shown(request.model)} does not exist here; this process serves "
                          f"{', '.join(repr(s) for s in served)}", "model", status=404, code="model_not_found")


def make_prompts(request: OpenAIRequest, tokenizer: Any, engine: Any,
                 default_chat_template: str | None = None) -> list[PromptInput]:
    """Tokenize and validate every prompt of a request, and its params against the engine.

    `tokenizer` is passed in (not taken from the engine) so that a server can tokenize on its
    own thread with its own copy. Text is tokenized as `LLM.generate` / `LLM.chat` do, so that
    the same prompt gives the same tokens (and output) through every entry point.
    """
    param = request.prompt_param
    inputs = []
    for i, prompt in enumerate(request.prompts):
        label = param if len(request.prompts) == 1 else f"{param}[{i}]"
        if isinstance(prompt, list) and request.kind == COMPLETIONS:
            raw: dict[str, Any] = {"prompt_token_ids": prompt}
            if request.echo and tokenizer is not None:
                raw["prompt"] = tokenizer.decode(prompt)
        else:
            if tokenizer is None:
                raise OpenAIError(f"{label}: text prompts need a tokenizer", param)
            if request.kind == CHAT:
                options = {"chat_template": default_chat_template, **request.chat_options}
                try:
                    text = render_chat(tokenizer, prompt, label, **options)
                except ValueError as err:
                    raise OpenAIError(str(err), param) from None
                except Exception as err:  # template errors (e.g. raise_exception on bad role order)
                    raise OpenAIError(f"{label}: the chat template failed: {err}", param) from None
                ids = tokenizer(text, add_special_tokens=False).input_ids
            else:
                text = prompt
            try:
                ids = tokenizer(text, add_special_tokens=request.kind != CHAT).input_ids
            except Exception as err:  # the text was checked; a tokenizer may still refuse some
                raise OpenAIError(f"{label}: the tokenizer failed: {type(err).__name__}: {err}", param) from None
            raw = {"prompt_token_ids": ids, "prompt": text}
        try:
            inputs.append(engine.make_prompt(raw, label, request.params.truncate_prompt_tokens))
        except ValueError as err:
            code = "context_length_exceeded" if "max_model_len" in str(err) else "invalid_value"
            raise OpenAIError(str(err), param, code=code) from None
    try:
        engine.check_params(request.params, "request")
    except ValueError as err:
        match = _ENGINE_PARAM_ERROR.match(str(err))
        if "StructuredOutputsParams" in str(err):
            param = request.structured_param
        else:
            param = request.source.get(match.group(1), match.group(1)) if match else None
        raise OpenAIError(str(err), param) from None
    for prompt in inputs:
        try:
            engine.check_fits(prompt, request.params, "request")
        except ValueError as err:
            raise OpenAIError(str(err), request.max_tokens_param, code="context_length_exceeded") from None
    return inputs


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _optional_bool(body: dict, name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise OpenAIError(f"{param or name} must be true or false, got {shown(value)}", param or name)
    return value


def _check_text(value: str, param: str) -> str:
    if not is_valid_text(value):
        raise OpenAIError(f"{param} is not valid Unicode (it holds a lone surrogate such as \\ud800)", param)
    return value


def _optional_text(body: dict, name: str, param: str | None = None) -> str | None:
    value = body.get(name)
    if value is not None:
        if not isinstance(value, str):
            raise OpenAIError(f"{param or name} must be a string, got {shown(value)}", param or name)
        _check_text(value, param or name)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS and not all(_is_int(t) for t in prompt):
        raise OpenAIError(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} go in one request", "prompt")
    if isinstance(prompt, str):
        return [_check_text(prompt, "prompt")]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [_check_text(p, "prompt") for p in prompt]
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    if prompt is None:
        raise OpenAIError("prompt is required", "prompt", code="missing_field")
    raise OpenAIError("prompt must be a string, a list of strings, a list of token ids or a list of "
                      f"token-id lists, got {_json_type(prompt)}", "prompt")


def _check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as the chat template takes them: role and text content (text parts joined)."""
    if messages is None:
        raise OpenAIError("messages is required", "messages", code="missing_field")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty array of messages", "messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise OpenAIError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {shown(role)}",
                              f"{where}.role")
        content = message.get("content")
        if content is None and role != "assistant":
            raise OpenAIError(f"{where}.content must be a string or an array of text parts", f"{where}.content")
        try:
            content = message_content(content, where)
        except ValueError as err:
            raise OpenAIError(str(err), f"{where}.content") from None
        entry = {"role": role, "content": _check_text(content, f"{where}.content")}
        name = _optional_text(message, "name", f"{where}.name")
        if name is not None:
            entry["name"] = name
        checked.append(entry)
    return checked


def _check_chat_extras(body: dict) -> None:
    if body.get("tools"):
        raise OpenAIError("tools are not supported", "tools", code="unsupported")
    if body.get("tool_choice") not in (None, "none"):
        raise OpenAIError("tool_choice is not supported", "tool_choice", code="unsupported")
