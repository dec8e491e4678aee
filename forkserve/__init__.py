"""forkserve: LLM inference for workloads where many sequences share context.

The public names are imported on first use, so that `forkserve --help` (and any import of a
submodule that needs no model) does not pay for importing torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "forkserve.api",
    "SamplingParams": "forkserve.sampling_params",
    "BeamSearchParams": "forkserve.sampling_params",
    "StructuredOutputsParams": "forkserve.sampling_params",
    "RequestOutputKind": "forkserve.sampling_params",
    "RequestOutput": "forkserve.outputs",
    "CompletionOutput": "forkserve.outputs",
    "Logprob": "forkserve.outputs",
    "RequestMetrics": "forkserve.outputs",
    "BeamSearchOutput": "forkserve.outputs",
    "BeamSearchSequence": "forkserve.outputs",
    "TextPrompt": "forkserve.inputs",
    "TokensPrompt": "forkserve.inputs",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forkserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
