"""The KV pool's sizing arithmetic (worker/memory.py), with the device's memory figures faked."""
from __future__ import annotations

import pytest
import torch

from forkserve.worker.memory import kv_pool_bytes

GIB = 1 << 30


@pytest.fixture
def device_with_80_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device of 80 GiB with 20 GiB in use (weights, workspace, context)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 19 * GIB)


def test_pool_gets_utilization_less_what_is_in_use_and_the_measured_peaks(device_with_80_gib: None) -> None:
    assert kv_pool_bytes(torch.device("cuda"), 0.9, eager_peak=2 * GIB, graphs=GIB) == 72 * GIB - 20 * GIB - 3 * GIB


def test_utilization_too_low_for_any_pool_is_named(device_with_80_gib: None) -> None:
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.25 leaves no memory for the KV pool.*20.00 are in use"):
        kv_pool_bytes(torch.device("cuda"), 0.25, eager_peak=2 * GIB, graphs=0)
