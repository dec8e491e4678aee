"""Shared fixtures: tiny checkpoints made once per test session."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from forkserve.model.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`factory(family, seed=0)` -> a tiny checkpoint directory, written once per session."""
    made: dict[tuple[str, int], Path] = {}

    def factory(family: str, seed: int = 0) -> Path:
        key = (family, seed)
        if key not in made:
            made[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}-{seed}"), family, seed)
        return made[key]

    return factory
