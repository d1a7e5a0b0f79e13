"""Shared fixtures: the embedded default model, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsv32.weights.default_model import ensure_default_model


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dsv32-cache")


@pytest.fixture(scope="session")
def default_model_dir(default_cache: Path) -> Path:
    return ensure_default_model(default_cache)
