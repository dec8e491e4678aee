"""The collectives of a tensor-parallel group: gloo on CPU (so CI runs the same code), NCCL on GPU.

Each group is its own torch.distributed process group over its own TCP store, never the
process-wide default group, so several engines can live in one process (one after another in
tests, or a rebuilt engine beside a failed one). Every wait has a timeout: a rank that dies
closes its connections and the others' collectives fail at once; a rank that hangs fails them
after COLLECTIVE_TIMEOUT_S.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_S = 300  # longest wait in one collective (also for the slowest rank's model load)
RENDEZVOUS_TIMEOUT_S = 120  # for every rank to connect after rank 0 started them


class TensorParallelGroup:
    """Rank `rank` of `size` ranks that split every layer of one model between them."""

    def __init__(self, rank: int, size: int, store: dist.Store, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        prefixed = dist.PrefixStore("tp", store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group: dist.ProcessGroup = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, size, timeout)

    @classmethod
    def create_store(cls, size: int) -> dist.TCPStore:
        """Rank 0's store, on a free loopback port, which the other ranks then join."""
        return dist.TCPStore("127.0.0.1", 0, size, is_master=True,
                             timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S), wait_for_workers=False)

    @classmethod
    def join_store(cls, port: int, size: int) -> dist.TCPStore:
        return dist.TCPStore("127.0.0.1", port, size, is_master=False,
                             timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (row-parallel layers' partial outputs)."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_columns(self, tensor: torch.Tensor) -> torch.Tensor:
        """[N, C] on every rank -> [N, size * C], rank r's columns at r * C (vocab-parallel logits)."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor on every rank, in place."""
        self.group.broadcast(tensor, 0).wait()  # the group's own call: it is not in torch's registry
        return tensor

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values (e.g. KV pages: every rank's pool must hold them)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return int(tensor.item())
