"""Shared fixtures for the whole test suite.

``shared_data`` locates ``../shared/data`` relative to the repository (never copied into it)
and skips the test when the folder is absent, so the suite stays green without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


def shared_data_path(*parts: str) -> Path:
    """Path under ``../shared/data``; calls ``pytest.skip`` when it does not exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ``../shared/data`` folder (skips the test when it is absent)."""
    return shared_data_path()


@pytest.fixture(scope="session")
def shared_events(shared_data: Path) -> Path:
    """The ``../shared/data/events`` folder (skips the test when it is absent)."""
    return shared_data_path("events")


@pytest.fixture(scope="session")
def shared_mnist(shared_data: Path) -> Path:
    """The ``../shared/data/mnist`` folder (skips the test when it is absent)."""
    return shared_data_path("mnist")
