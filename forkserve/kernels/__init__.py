"""GPU kernels (Triton) behind plain-torch code paths; Triton is imported only when one is used."""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn: fp8 KV pages saturate there (worker/kv_cache.py, fused.py)
LEVEL_TILE_TOKENS = 32  # query tokens per work item of the shared-level kernel (shared_level.py)


@functools.cache
def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"forkserve.kernels.{name}")
    except ImportError:  # no Triton (CPU installs)
        return None


def gpu_kernels(name: str, x: torch.Tensor) -> ModuleType | None:
    """forkserve.kernels.<name> when `x` lives on a CUDA device and Triton is installed, else None."""
    return _load(name) if x.is_cuda else None
