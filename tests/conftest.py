"""Shared fixtures: tiny checkpoints made once per test session."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from forkserve.model.tiny import make_tiny_model


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
