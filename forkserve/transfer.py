"""Host-to-device copies that do not stall the GPU queue.

A plain ``torch.tensor(data, device="cuda")`` copies from pageable memory and then waits for the
whole CUDA stream, so the host cannot prepare step k+1 while step k runs. Staging through pinned
memory makes the copy asynchronous; PyTorch's caching host allocator keeps the pinned block alive
until the copy has run.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_device(data: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a list, numpy array or CPU tensor) as a tensor on `device`, without a stream sync."""
    tensor = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.as_tensor(data, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def fill_from_host(buffers_and_arrays: list[tuple[torch.Tensor, np.ndarray]]) -> None:
    """Copy int32 host arrays into the start of int32 device buffers, through one staged copy
    (one pinned block and one transfer however many buffers a step fills)."""
    device = buffers_and_arrays[0][0].device
    staged = to_device(np.concatenate([array.ravel() for _, array in buffers_and_arrays]), device)
    at = 0
    for buffer, array in buffers_and_arrays:
        buffer.view(-1)[:array.size].copy_(staged[at:at + array.size])
        at += array.size
