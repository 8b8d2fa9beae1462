"""Shared fixtures. Tests that need ``../shared`` (weights, benchmark sets) skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PAN_SHARED_DIR", REPO.parent / "shared"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared data), which is absent here")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def benchmarks_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "benchmarks")


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "weights")
