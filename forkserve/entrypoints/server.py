"""`forkserve serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine.

Routes: POST /v1/completions and /v1/chat/completions (streaming as OpenAI streams: server-sent
`data: {...}` chunks, then `data: [DONE]`), GET /v1/models, /v1/models/{id}, /health, /version
and /metrics (Prometheus text: forkserve's and vLLM's names), POST /tokenize and /detokenize
(vLLM's). All requests share one `Engine`, run by `EngineLoop` on its own thread, so requests that
arrive over time batch together and share the prefix tree.

Guards: with an API key every route but /health needs `Authorization: Bearer KEY` (401);
bodies are bounded (413); prompts are checked against max_model_len (400); at most
`max_waiting` requests wait for the running batch (429 past it); a client that goes away has
its requests aborted, which frees their KV pages. Errors use OpenAI's error object.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from forkserve.entrypoints import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING
from forkserve.entrypoints.engine_loop import EngineDead, EngineLoop, RequestStream, StreamEvent
from forkserve.chat import render_chat
from forkserve.entrypoints.openai_protocol import (CHAT, COMPLETIONS, OpenAIError, OpenAIRequest, check_model,
                                                   error_body, make_prompts, new_id, parse_json, parse_request)
from forkserve.entrypoints.openai_responses import (chat_chunk, chat_logprobs, completion_chunk, completion_logprobs,
                                                    response_body, usage, usage_chunk)
from forkserve.entrypoints.server_metrics import prometheus_text
from forkserve.outputs import CompletionOutput, RequestOutput
from forkserve.sampling_params import shown

logger = logging.getLogger(__name__)

_POLL_S = 0.5  # how often a waiting handler checks for a vanished client or a dead engine


def build_app(engine_loop: EngineLoop, served_model_names: list[str], *, api_key: str | None = None,
              max_waiting: int = DEFAULT_MAX_WAITING, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              tokenizer: Any = None, chat_template: str | None = None,
              response_role: str = "assistant") -> FastAPI:
    """The app; its lifespan starts and stops `engine_loop`.

    Prompts are tokenized and outputs built on the event loop with `tokenizer` (by default a
    second copy of the engine's, loaded here), never with the engine's own, which the engine
    thread uses. Requests may name the model by a served name or by the engine's model path
    (the --model value). `chat_template` replaces the tokenizer's (vLLM's --chat-template);
    `response_role` is the chat answers' role.
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a non-empty --api-key / FORKSERVE_API_KEY, or none at all")
    # Set-up only: after a fault the loop may run a new engine, and no route may keep the old one alive.
    engine = engine_loop.engine
    root, max_model_len, vocab_size = engine.config.model, engine.max_model_len, engine.model_config.vocab_size
    accepted_names = [*served_model_names, root]
    engine_loop.model_name = served_model_names[0]
    if tokenizer is None and engine.tokenizer is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(engine.config.tokenizer or engine.config.model,
                                                  trust_remote_code=False)
    del engine
    # Tokenizing (and rendering chat templates of) a large body takes a while: it runs off the
    # event loop, so health checks and streams go on meanwhile, on one thread, since a fast
    # tokenizer refuses to be used by two threads at once.
    tokenize_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forkserve-tokenize")
    started_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine_loop.stop()
            tokenize_thread.shutdown(wait=False)

    app = FastAPI(title="forkserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else \
            {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{err.detail}: {request.method} {request.url.path}"
        return JSONResponse(error_body(message, "invalid_request_error", None, None), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error", None, None),
                            status_code=500)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise OpenAIError("missing or incorrect API key: send 'Authorization: Bearer <key>'", None,
                              status=401, code="invalid_api_key")

    guarded = [Depends(authorize)]

    @app.api_route("/ping", methods=["GET", "POST"])
    @app.get("/health")
    async def health() -> Response:
        if engine_loop.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body(engine_loop.error or "the engine is not running", "server_error", None,
                                       "engine_dead"), status_code=503)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started_at, "owned_by": "forkserve",
                "root": root, "parent": None, "max_model_len": max_model_len}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in served_model_names]}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in accepted_names:
            raise OpenAIError(f"the model {model_id!r} does not exist here; this process serves "
                              f"{', '.join(repr(s) for s in served_model_names)}", "model", status=404,
                              code="model_not_found")
        return model_card(model_id)

    @app.get("/version")
    async def version() -> dict[str, str]:
        from forkserve import __version__

        return {"version": __version__}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request, max_request_bytes)
        ids = tokenize_body(body, tokenizer, accepted_names, chat_template)
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request, max_request_bytes)
        return {"prompt": detokenize_body(body, tokenizer, accepted_names, vocab_size)}

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine_loop), media_type="text/plain; version=0.0.4")

    async def generate(request: Request, kind: str) -> Response:
        body = await read_json(request, max_request_bytes)
        current = engine_loop.engine
        if current is None:
            raise OpenAIError("the engine is being rebuilt after a fault; retry shortly", None, status=503,
                              type="server_error", code="engine_restarting")
        try:
            parsed = parse_request(kind, body, current.default_sampling_overrides)
            parsed.response_role = response_role
            check_model(parsed, accepted_names)
            prompts = await asyncio.get_running_loop().run_in_executor(tokenize_thread, make_prompts, parsed,
                                                                       tokenizer, current, chat_template)
        except OpenAIError:
            raise
        except Exception as err:  # a body the checks did not foresee: still this request's fault alone
            logger.exception("a request body failed validation unexpectedly")
            raise OpenAIError(f"the request could not be read: {type(err).__name__}: {shown(str(err))}", None,
                              code="invalid_request") from None
        if engine_loop.num_waiting >= max_waiting:
            engine_loop.counts["rejected"] += 1
            raise OpenAIError(f"the server is busy: {engine_loop.num_waiting} requests are already waiting for "
                              f"the running batch (the limit, --max-waiting, is {max_waiting}); retry later",
                              None, status=429, type="rate_limit_error", code="rate_limit_exceeded")
        request_id = new_id(kind)
        try:
            handle = engine_loop.submit([(f"{request_id}-{i}", p, parsed.beam_search_params(p, max_model_len)
                                          if parsed.use_beam_search else parsed.params)
                                         for i, p in enumerate(prompts)], stream=parsed.stream)
        except EngineDead as err:
            raise OpenAIError(str(err), None, status=503, type="server_error", code="engine_dead") from None
        model = parsed.model or served_model_names[0]
        if parsed.stream:
            return EventStreamResponse(stream_events(handle, parsed, request_id, model, engine_loop,
                                                     [p.text or "" for p in prompts]), handle)
        outputs = await collect(handle, request, engine_loop)
        if outputs is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return JSONResponse(response_body(parsed, request_id, model, outputs))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request) -> Response:
        return await generate(request, COMPLETIONS)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request) -> Response:
        return await generate(request, CHAT)

    return app


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 415 unless sent as application/json (vLLM's rule), 413 past `limit`
    bytes, 400 if it does not parse."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise OpenAIError(f"Unsupported Media Type: only 'application/json' is allowed, got "
                          f"{media_type or 'no Content-Type'}", None, status=415, code="unsupported_media_type")
    too_big = OpenAIError(f"the request body exceeds the limit of {limit} bytes", None, status=413,
                          code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_big
    return parse_json(data)


def _prompt_index(handle: RequestStream, request_id: str) -> int:
    return handle.request_ids.index(request_id)


async def collect(handle: RequestStream, request: Request, engine_loop: EngineLoop) -> list[RequestOutput] | None:
    """Wait for every final output (None if the client disconnected: its requests are aborted)."""
    outputs: dict[str, RequestOutput] = {}
    try:
        while not handle.done:
            events = await handle.wait(_POLL_S)
            for event in events:
                if event.kind == "error":
                    fault = event.status >= 500
                    raise OpenAIError(event.message or "the request failed", None, status=event.status,
                                      type="server_error" if fault else "invalid_request_error",
                                      code="engine_fault" if fault else "invalid_request")
                if event.kind == "final":
                    outputs[event.request_id] = event.output  # type: ignore[assignment]
            if not events:
                if not engine_loop.alive:
                    raise OpenAIError(engine_loop.error or "the engine stopped", None, status=503,
                                      type="server_error", code="engine_dead")
                if await request.is_disconnected():
                    return None
        return [outputs[request_id] for request_id in handle.request_ids]
    finally:
        handle.close()


class ChoiceStream:
    """One choice's streamed text: what was sent, and the next delta from a newer snapshot.

    Text that could still turn out to be the start of a stop string (the last len(stop)-1
    characters) and an incomplete UTF-8 character at the end are held back until decided.
    """

    def __init__(self, stop: list[str]) -> None:
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent_text = ""
        self.sent_tokens = 0
        self.text_offset = 0  # completions logprobs: characters of token text sent so far
        self.finished = False

    def update(self, completion: CompletionOutput) -> tuple[str, int, int]:
        """(text delta, first new token index, end token index); marks the choice finished."""
        text = completion.text
        if completion.finish_reason is None:
            cut = len(text) - self.hold
            text = text[:max(cut, 0)].rstrip("\ufffd")
            if len(text) < len(self.sent_text):
                text = self.sent_text
        else:
            self.finished = True
        delta = text[len(self.sent_text):]  # decoding more tokens only appends to the text
        self.sent_text += delta
        start, self.sent_tokens = self.sent_tokens, len(completion.token_ids)
        return delta, start, self.sent_tokens


class EventStreamResponse(StreamingResponse):
    """Server-sent events that abort their requests however the response ends: also when the
    client is gone before the event generator was first entered (its `finally` never runs then)."""

    def __init__(self, events: AsyncIterator[str], handle: RequestStream) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.close()


def _sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def stream_events(handle: RequestStream, parsed: OpenAIRequest, request_id: str, model: str,
                        engine_loop: EngineLoop, prompt_texts: list[str]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them (with echo, a completion's prompt comes first);
    on disconnect the generator is cancelled and the `finally` aborts what is still running."""
    n = parsed.params.n
    want_logprobs = parsed.params.logprobs is not None
    choices: dict[int, ChoiceStream] = {}
    latest: dict[str, RequestOutput] = {}
    try:
        for p in range(len(handle.request_ids)):
            for i in range(n):
                choices[p * n + i] = ChoiceStream(parsed.params.stop)
                if parsed.kind == CHAT:
                    yield _sse(chat_chunk(parsed, request_id, model, p * n + i,
                                          {"role": parsed.response_role, "content": ""}))
                if parsed.echo and parsed.kind == COMPLETIONS and prompt_texts[p]:
                    yield _sse(completion_chunk(parsed, request_id, model, p * n + i, prompt_texts[p]))
        while not handle.done:
            events = await handle.wait(_POLL_S)
            if not events and not engine_loop.alive:
                events = [_dead_event(handle, engine_loop)]
            for event in events:
                if event.kind == "error":
                    fault = event.status >= 500
                    yield _sse(error_body(event.message or "the request failed",
                                          "server_error" if fault else "invalid_request_error", None,
                                          "engine_fault" if fault else "invalid_request"))
                    yield _sse("[DONE]")
                    return
                latest[event.request_id] = event.output  # type: ignore[assignment]
                p = _prompt_index(handle, event.request_id)
                for completion in event.output.outputs:  # type: ignore[union-attr]
                    state = choices[p * n + completion.index]
                    if not state.finished:
                        for chunk in _choice_chunks(parsed, request_id, model, p * n + completion.index, state,
                                                    completion, want_logprobs):
                            if parsed.continuous_usage:
                                chunk["usage"] = usage(list(latest.values()))
                            yield _sse(chunk)
        if parsed.include_usage:
            yield _sse(usage_chunk(parsed, request_id, model, [latest[r] for r in handle.request_ids]))
        yield _sse("[DONE]")
    finally:
        handle.close()


def _dead_event(handle: RequestStream, engine_loop: EngineLoop) -> StreamEvent:
    return StreamEvent("error", handle.request_ids[0], message=engine_loop.error or "the engine stopped")


def _choice_chunks(parsed: OpenAIRequest, request_id: str, model: str, index: int, state: ChoiceStream,
                   completion: CompletionOutput, want_logprobs: bool) -> list[dict[str, Any]]:
    text, start, end = state.update(completion)
    chunks = []
    if text or (want_logprobs and end > start):
        logprobs = None
        if want_logprobs and completion.logprobs is not None:
            ids, entries = completion.token_ids[start:end], completion.logprobs[start:end]
            if parsed.kind == CHAT:
                logprobs = chat_logprobs(ids, entries, parsed.params.logprobs or 0)
            else:
                logprobs = completion_logprobs(ids, entries, state.text_offset)
                state.text_offset += sum(len(t) for t in logprobs["tokens"])
        if parsed.kind == CHAT:
            chunks.append(chat_chunk(parsed, request_id, model, index, {"content": text}, logprobs))
        else:
            chunks.append(completion_chunk(parsed, request_id, model, index, text, logprobs))
    if state.finished:
        if parsed.kind == CHAT:
            chunks.append(chat_chunk(parsed, request_id, model, index, {}, None, completion.finish_reason))
        else:
            chunks.append(completion_chunk(parsed, request_id, model, index, "", None, completion.finish_reason))
    return chunks


def tokenize_body(body: Any, tokenizer: Any, accepted_names: list[str], chat_template: str | None) -> list[int]:
    """vLLM's /tokenize: a completion `prompt` (add_special_tokens defaults to true) or chat
    `messages` rendered by the chat template (add_special_tokens defaults to false)."""
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    _check_model_name(body, accepted_names)
    if tokenizer is None:
        raise OpenAIError("tokenize needs a tokenizer (the engine runs with skip_tokenizer_init)")
    if "messages" in body:
        chat = parse_request(CHAT, {k: body[k] for k in ("messages", "add_generation_prompt", "continue_final_message",
                                                         "chat_template_kwargs", "chat_template") if k in body})
        messages, options = chat.prompts[0], chat.chat_options
        try:
            text = render_chat(tokenizer, messages, "messages", **{"chat_template": chat_template, **options})
        except ValueError as err:
            raise OpenAIError(str(err), "messages") from None
        add_special = body.get("add_special_tokens", False)
    elif isinstance(body.get("prompt"), str):
        text, add_special = body["prompt"], body.get("add_special_tokens", True)
    else:
        raise OpenAIError("tokenize needs 'prompt' (a string) or 'messages'", "prompt", code="missing_field")
    if not isinstance(add_special, bool):
        raise OpenAIError(f"add_special_tokens must be true or false, got {add_special!r}", "add_special_tokens")
    return tokenizer(text, add_special_tokens=add_special).input_ids


def detokenize_body(body: Any, tokenizer: Any, accepted_names: list[str], vocab_size: int) -> str:
    """vLLM's /detokenize: token ids to text."""
    if not isinstance(body, dict):
        raise OpenAIError("the request body must be a JSON object")
    _check_model_name(body, accepted_names)
    if tokenizer is None:
        raise OpenAIError("detokenize needs a tokenizer (the engine runs with skip_tokenizer_init)")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise OpenAIError("tokens must be a list of token ids", "tokens")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise OpenAIError(f"tokens holds token id(s) {bad[:8]} outside the vocabulary [0, {vocab_size})", "tokens")
    return tokenizer.decode(tokens)


def _check_model_name(body: dict, accepted_names: list[str]) -> None:
    model = body.get("model")
    if model is not None and model not in accepted_names:
        raise OpenAIError(f"the model {model!r} does not exist here", "model", status=404, code="model_not_found")


def serve(engine_loop: EngineLoop, served_model_names: list[str], *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, log_level: str = "info",
          chat_template: str | None = None, response_role: str = "assistant", access_log: bool = True) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = build_app(engine_loop, served_model_names, api_key=api_key, max_waiting=max_waiting,
                    max_request_bytes=max_request_bytes, chat_template=chat_template, response_role=response_role)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=access_log))
    engine_loop.on_dead = lambda: setattr(server, "should_exit", True)  # no engine: end the process
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it caught again once it has shut down
        pass
