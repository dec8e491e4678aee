"""Shared fixtures: tiny checkpoints made once per test session; engines freed after each test."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable, Iterator

import pytest

from forkserve.model.tiny import make_tiny_model


@pytest.fixture(autouse=True)
def _free_engines_after_each_test() -> Iterator[None]:
    """An engine on the CPU holds a 1 GiB KV pool, and engines sit in reference cycles that only a
    full garbage collection frees: collect after each test, or a file of engine tests can reach the
    machine's memory before Python gets round to it."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`factory(family, seed=0, head_dim=16)` -> a tiny checkpoint directory, written once per session."""
    made: dict[tuple[str, int, int], Path] = {}

    def factory(family: str, seed: int = 0, head_dim: int = 16) -> Path:
        key = (family, seed, head_dim)
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}-{seed}"), family, seed, head_dim)
        return made[key]

    return factory
