"""What crosses the line between the engine core and the worker: one step's plan, one step's result.

The core (forkserve/engine) decides; the worker (runner, CUDA graphs, attention backends, sampler
kernels, model) computes. A `StepPlan` holds only flat numpy arrays, ints and plain dataclasses
of values, so it can be handed to another process (tensor-parallel ranks) as it is; the worker
never sees a sequence, a tree node or the scheduler. This module is the worker's interface: the
core imports the worker through it and `worker.worker.Worker` only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from forkserve.sampler import SamplerOutput, SamplingRow, TokenBitmask

__all__ = ["PLACEHOLDER", "TransferKind", "KVTransfer", "Sharing", "DrawRequest", "PromptLogprobRange", "PromptLogprobs", "StepPlan", "StepResult",
           "SamplingRow", "SamplerOutput", "TokenBitmask"]

PLACEHOLDER = -1  # token id of a draw still on the GPU; the step that reads it takes it from there


class TransferKind(IntEnum):
    """What a `KVTransfer` moves: `src` and `dst` index GPU pages or host-tier slots as named."""

    COPY = 0  # GPU page -> GPU page (a fork's partly filled last page)
    OFFLOAD = 1  # GPU page -> host slot (evicted to the host tier)
    LOAD = 2  # host slot -> GPU page (a host-tier hit)
    SAVE_GPU = 3  # GPU page -> disk file named by keys[i] (dst unused)
    SAVE_HOST = 4  # host slot -> disk file named by keys[i] (dst unused)
    LOAD_DISK = 5  # the page of keys[i], read and checked by `Worker.read_disk_pages` -> GPU page dst[i]


@dataclass
class KVTransfer:
    """One move of KV pages between places; a plan's transfers run in order before its step
    writes any KV, and within one transfer no page is written twice nor read after it is written."""

    kind: TransferKind
    src: np.ndarray  # [N] int32
    dst: np.ndarray  # [N] int32
    keys: np.ndarray | None = None  # [N, 16] uint8: content keys (saves to disk)


@dataclass
class Sharing:
    """Which of a step's rows share which leading pages, as the core's prefix tree says (the
    shared-prefix levels the attention backends build from it: worker/attention/cascade.py).

    Per kept depth (a level): `group_of_row[level][b]` is row b's group in that level (-1: none)
    and `groups[level][g]` is group g's (first page, end page) on its members' page tables and
    its first member row. `cuts[b]` is the page row b's own pages start at.
    """

    group_of_row: np.ndarray  # [L, B] int64
    groups: list[np.ndarray]  # per level [G, 3] int64: start page, end page, first row
    cuts: np.ndarray  # [B] int64

    @property
    def shared_pages(self) -> int:
        """Pages one layer reads for the levels: each group's once."""
        return int(sum((g[:, 1] - g[:, 0]).sum() for g in self.groups))


@dataclass
class DrawRequest:
    """What one sampling row wants from its logits row this step (synchronous steps)."""

    rows: list[SamplingRow] = field(default_factory=list)  # one seeded draw per continuation (a fork: several)
    top_k: int = 0  # beam probe: the k best (token, logprob) of the raw log-softmax instead


@dataclass
class PromptLogprobRange:
    """Prompt logprobs one row asks for this step (vLLM's prompt_logprobs): the step's tokens
    input_ids[first_token:first_token + len(targets)] predict `targets`, the prompt tokens after them."""

    row: int  # the plan's row (the core reads the values back by it)
    first_token: int  # index into the step's input_ids
    targets: np.ndarray  # [n] int64
    top_k: int  # top logprobs per position (ALL_LOGPROBS: the whole vocabulary)


# Per predicted prompt token: its logprob, its rank, and the top (token, logprob) pairs
PromptLogprobs = list[tuple[float, int, list[tuple[int, float]]]]


@dataclass
class StepPlan:
    """One step for the worker: B rows (sequences) adding T new tokens in all.

    Row b's new tokens are input_ids[query_start[b]:query_start[b+1]], at positions from
    num_computed[b]; its KV pages are kv_indices[kv_indptr[b]:kv_indptr[b+1]]. A PLACEHOLDER
    token is replaced on the device by a previous step's draw (`pending`). `transfers` run, in
    order, before the step writes any KV (forks' page copies, tier moves).
    """

    input_ids: np.ndarray  # [T] int64
    query_start: np.ndarray  # [B + 1] int32
    num_computed: np.ndarray  # [B] int64: tokens in KV before this step
    kv_indptr: np.ndarray  # [B + 1] int32
    kv_indices: np.ndarray  # int32
    logits_rows: list[int]  # token indices (increasing) whose logits are sampled: each sampling row's last
    draws: list[DrawRequest] | None = None  # synchronous step: per logits row, in order
    rows: list[SamplingRow] | None = None  # launched step (async scheduling): one plain draw per logits row
    pending: list[tuple[int, int]] = field(default_factory=list)  # (token index, previous step's draw row)
    sharing: Sharing | None = None
    sharing_key: int = -1  # equal keys: equal sharing (the worker reuses what it built from it)
    transfers: list[KVTransfer] = field(default_factory=list)
    bitmask: TokenBitmask | None = None  # synchronous step: allowed tokens of its constrained draw rows
    prompt_logprobs: list[PromptLogprobRange] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.num_computed)

    @property
    def page_copies(self) -> np.ndarray | None:
        """The GPU page copies among the transfers ([N, 2] int32: source, destination), or None."""
        copies = [np.stack([t.src, t.dst], axis=1) for t in self.transfers if t.kind is TransferKind.COPY]
        return np.concatenate(copies).astype(np.int32) if copies else None


@dataclass
class StepResult:
    """A synchronous step's draws."""

    sampled: SamplerOutput | None  # the draws of every request's rows, flattened in order
    first_row: list[int]  # per draw request, the index of its first draw in `sampled`
    top: list[list[tuple[int, float]] | None]  # per draw request, its probe's candidates (best first)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # per plan.prompt_logprobs entry


# ------------------------------------------------------------------------ the ranks' message
# Tensor-parallel ranks run every step's forward; only rank 0 samples. So a rank's message holds
# the plan less its sampling part (draws, rows, bitmask): flat integer arrays behind a header of
# their dtypes and shapes, no pickle.
EXECUTE, LAUNCH = 0, 1  # a synchronous step; a launched one (its draws follow as a broadcast)
_ARRAY_DTYPES = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.uint8))
_HEADER_LENGTH = np.dtype("<u8")


def pack_arrays(arrays: list[np.ndarray]) -> bytes:
    """Integer arrays as one buffer: header length, header (count, then dtype, ndim, shape each), data."""
    header = [len(arrays)]
    for array in arrays:
        header += [_ARRAY_DTYPES.index(array.dtype), array.ndim, *array.shape]
    head = np.array(header, dtype=np.int64).tobytes()
    parts = [np.array(len(head), dtype=_HEADER_LENGTH).tobytes(), head]
    for array in arrays:  # each padded to 8 bytes, so that every array is aligned
        data = np.ascontiguousarray(array).tobytes()
        parts += [data, bytes(-len(data) % 8)]
    return b"".join(parts)


def unpack_arrays(message: bytes) -> list[np.ndarray]:
    """What pack_arrays packed, as writable arrays over one copy of the message."""
    buffer = bytearray(message)
    head_length = int(np.frombuffer(buffer, dtype=_HEADER_LENGTH, count=1)[0])
    offset = _HEADER_LENGTH.itemsize
    header = np.frombuffer(buffer, dtype=np.int64, count=head_length // 8, offset=offset).tolist()
    offset += head_length
    arrays, at = [], 1
    for _ in range(header[0]):
        dtype, ndim = _ARRAY_DTYPES[header[at]], header[at + 1]
        shape = tuple(header[at + 2:at + 2 + ndim])
        at += 2 + ndim
        count = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape))
        offset += -(-count * dtype.itemsize // 8) * 8
    return arrays


def encode_for_ranks(plan: StepPlan, kind: int) -> bytes:
    """The part of `plan` every rank needs for the forward (all but its sampling), and its kind."""
    sharing = plan.sharing
    scalars = [kind, plan.sharing_key, sharing is not None, len(plan.transfers),
               len(sharing.groups) if sharing is not None else 0, len(plan.prompt_logprobs)]
    arrays = [np.array(scalars, dtype=np.int64), plan.input_ids, plan.query_start, plan.num_computed,
              plan.kv_indptr, plan.kv_indices, np.array(plan.logits_rows, dtype=np.int64),
              np.array(plan.pending, dtype=np.int64).reshape(-1, 2)]
    for transfer in plan.transfers:  # every rank moves its own heads' share of the same pages and slots
        arrays += [np.array([transfer.kind, transfer.keys is not None], dtype=np.int64),
                   np.asarray(transfer.src, dtype=np.int32), np.asarray(transfer.dst, dtype=np.int32)]
        if transfer.keys is not None:
            arrays.append(np.asarray(transfer.keys, dtype=np.uint8))
    if sharing is not None:
        arrays += [sharing.group_of_row, sharing.cuts, *sharing.groups]
    ranges = plan.prompt_logprobs
    arrays.append(np.array([[r.row, r.first_token, r.top_k] for r in ranges], dtype=np.int64).reshape(-1, 3))
    arrays += [np.asarray(r.targets, dtype=np.int64) for r in ranges]
    return pack_arrays(arrays)


def decode_for_ranks(message: bytes) -> tuple[int, StepPlan]:
    """(kind, plan) from encode_for_ranks' bytes; the plan has no sampling part."""
    arrays = iter(unpack_arrays(message))
    kind, sharing_key, has_sharing, num_transfers, levels, num_ranges = next(arrays).tolist()
    input_ids, query_start, num_computed, kv_indptr, kv_indices = (next(arrays) for _ in range(5))
    logits_rows, pending = next(arrays).tolist(), [tuple(p) for p in next(arrays).tolist()]
    transfers = []
    for _ in range(num_transfers):
        transfer_kind, has_keys = next(arrays).tolist()
        src, dst = next(arrays), next(arrays)
        transfers.append(KVTransfer(TransferKind(transfer_kind), src, dst, next(arrays) if has_keys else None))
    sharing = None
    if has_sharing:
        group_of_row, cuts = next(arrays), next(arrays)
        sharing = Sharing(group_of_row, [next(arrays) for _ in range(levels)], cuts)
    ranges = next(arrays).tolist()
    prompt_logprobs = [PromptLogprobRange(row, first, next(arrays), top_k) for row, first, top_k in ranges]
    assert len(ranges) == num_ranges
    return kind, StepPlan(input_ids, query_start, num_computed, kv_indptr, kv_indices, logits_rows,
                          pending=pending, sharing=sharing, sharing_key=sharing_key, transfers=transfers,
                          prompt_logprobs=prompt_logprobs)
