"""How one model is split between tensor-parallel ranks (Megatron's scheme, as vLLM splits it).

Column-parallel: q/k/v by heads, gate/up by columns of the intermediate width (each expert's
too), so each rank computes its heads' attention and its slice of the MLP alone. Row-parallel:
o and down take their slice of the input columns and their partial outputs are summed over the
ranks (one all-reduce each). Vocabulary-parallel: each rank holds ceil(V / N) rows of the
embedding and the LM head; lookups are summed (a token's row is non-zero on one rank only) and
logits gathered. With fewer KV heads than ranks, each KV head is replicated on N / Hkv ranks.
Norms, rotary tables and MoE routers are replicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from forkserve.model.config import ModelConfig


class Collectives(Protocol):
    """What the model needs from its tensor-parallel group (forkserve/distributed/group.py)."""

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_columns(self, tensor: torch.Tensor) -> torch.Tensor: ...


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse a split the model's shapes do not allow, naming both numbers."""
    if size == 1:
        return
    if config.num_heads % size:
        raise ValueError(f"tensor_parallel_size={size} does not divide the model's {config.num_heads} "
                         "attention heads: choose a size that divides them")
    kv = config.num_kv_heads
    if (kv >= size and kv % size) or (kv < size and size % kv):
        raise ValueError(f"tensor_parallel_size={size} and the model's {kv} KV heads: one must divide the other")
    for name in ("intermediate_size", "moe_intermediate_size"):
        width = getattr(config, name)
        if width % size:
            raise ValueError(f"tensor_parallel_size={size} does not divide the model's {name} {width}")


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`'s part of every sharded dimension of `config`."""

    config: ModelConfig
    rank: int = 0
    size: int = 1

    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.size

    @property
    def first_head(self) -> int:
        return self.rank * self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.config.num_kv_heads // self.size)

    @property
    def first_kv_head(self) -> int:
        """Rank r's first KV head; replicated heads (fewer than ranks) go to consecutive ranks."""
        return self.rank * self.config.num_kv_heads // self.size

    def intermediate(self, width: int) -> tuple[int, int]:
        """(first column, columns) of an MLP's intermediate width on this rank."""
        return self.rank * (width // self.size), width // self.size

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding and LM head each rank holds (the last rank's tail is padding)."""
        return -(-self.config.vocab_size // self.size)

    @property
    def first_vocab_row(self) -> int:
        return self.rank * self.vocab_rows

    @property
    def real_vocab_rows(self) -> int:
        """Rows of this rank's part that are real tokens."""
        return max(0, min(self.vocab_rows, self.config.vocab_size - self.first_vocab_row))
