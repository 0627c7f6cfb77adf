"""Shared fixtures. Data under ../shared/data is required in CI (FEDDP_REQUIRE_DATA=1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDDP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def require_data(relative: str) -> Path:
    """Path of a file under ../shared/data; skip if absent, fail if CI requires it."""
    path = SHARED_DATA / relative
    if not path.exists():
        message = f"test data not found: {path}"
        if os.environ.get("FEDDP_REQUIRE_DATA") == "1":
            pytest.fail(message + " (FEDDP_REQUIRE_DATA=1)")
        pytest.skip(message)
    return path


@pytest.fixture
def shared_data() -> Path:
    return require_data("")


@pytest.fixture
def cmu1_path() -> Path:
    return require_data("slides/CMU-1-Small-Region.svs")
