"""Fixtures for tests with real processes on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.remote.processes import Cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Starts servers and workers; kills and reaps every one of them at the end."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        with trio.CancelScope(shield=True):
            await c.stop_all()
