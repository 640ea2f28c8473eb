"""In-process service fixtures: apps built with create_app(settings), lifespans run."""

from __future__ import annotations

import pytest
from qumos.artifact import load_artifact


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def artifact(small_artifact):
    return load_artifact(small_artifact)
