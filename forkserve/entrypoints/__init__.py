"""Ways into the engine besides `LLM`: the OpenAI-compatible server and the batch runner.

- `openai_protocol`: OpenAI request bodies -> prompts + `SamplingParams`, outputs -> OpenAI
  response objects (shared by both entry points, so they map fields the same way).
- `batch_runner`: `forkserve run-batch`, OpenAI Batch API files, resumable.
- `engine_loop`: one thread that owns an `Engine` and feeds per-request outputs to asyncio.
- `server`: `forkserve serve`, FastAPI routes on top of `engine_loop`.
- `commands`: the argparse wiring of `run-batch` and `serve`.

Only `server` and `engine_loop` need fastapi/uvicorn; they are imported when used.
"""

DEFAULT_MAX_WAITING = 1024  # serve: requests that may wait for the running batch before 429
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # serve: largest request body (413 past it)
