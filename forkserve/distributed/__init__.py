"""Several processes serving one engine: the tensor-parallel group's collectives (`group.py`) and
the rank processes rank 0 starts, feeds and stops (`ranks.py`).

Nothing here knows the engine or the model: ranks exchange bytes and tensors only, so data
parallel replicas and pipeline stages can reuse it.
"""
from forkserve.distributed.group import COLLECTIVE_TIMEOUT_S, TensorParallelGroup
from forkserve.distributed.ranks import RankFailure, RankLink, RankProcesses

__all__ = ["COLLECTIVE_TIMEOUT_S", "TensorParallelGroup", "RankFailure", "RankLink", "RankProcesses"]
