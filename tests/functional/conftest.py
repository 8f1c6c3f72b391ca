"""Functional tests run the whole gateway: any blocking call it makes on the event loop fails them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from tests.support.redis_servers import RedisServer, start_server


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail the test if gateway code blocks the event loop (file or socket I/O, sleep, locks...).

    Only calls made from the ``gateway`` package are checked: the tests themselves may write
    fixture files synchronously."""
    with blockbuster_ctx("gateway") as bb:
        yield bb


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a free port, stopped after it."""
    server = start_server(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
