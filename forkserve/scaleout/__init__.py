"""Scale-out: one batch planned across data-parallel replicas (partition.py, work_queues.py: plain
numpy/Python; ray_replicas.py: the Ray actors and driver, imported only when used). The front
ends (api.LLM, entrypoints) call in; nothing here imports them (the LLM class is passed in)."""
from __future__ import annotations

from typing import Any, Callable


def _import_ray_replicas():
    try:
        from forkserve.scaleout import ray_replicas
    except ImportError as err:
        if err.name != "ray" and not (err.name or "").startswith("ray."):
            raise
        raise ValueError("data_parallel_size > 1 runs replicas on Ray, which is not installed: "
                         "pip install 'forkserve[ray]'") from None
    return ray_replicas


def data_parallel_llm(make_llm: Callable[..., Any], model: str, size: int, engine_kwargs: dict[str, Any]):
    """`LLM.generate` over `size` Ray replica actors, each a `make_llm(model, **engine_kwargs)`
    (ray_replicas.DataParallelLLM)."""
    return _import_ray_replicas().DataParallelLLM(make_llm, model, size, engine_kwargs)


def replica_set(make_llm: Callable[..., Any], model: str, size: int, engine_kwargs: dict[str, Any]):
    """`size` Ray replica actors, each a `make_llm(model, **engine_kwargs)` (ray_replicas.ReplicaSet)."""
    return _import_ray_replicas().ReplicaSet(make_llm, model, size, engine_kwargs)
