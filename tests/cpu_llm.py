"""`cpu_llm`: an fp32 CPU `LLM` with small KV pages and a small pool, as the fork tests use it."""
from __future__ import annotations

from typing import Any

from forkserve import LLM

PAGE = 4  # tokens per KV page: small, so prompts span several pages and partial pages are common


def cpu_llm(model_dir: str, **kwargs: Any) -> LLM:
    """A pool of 2,048 pages unless told otherwise: the 1 GiB CPU default costs seconds per engine."""
    settings: dict[str, Any] = dict(device="cpu", dtype="float32", block_size=PAGE, num_gpu_blocks_override=2048)
    settings.update(kwargs)
    return LLM(model_dir, **settings)
