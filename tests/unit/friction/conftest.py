"""A real Redis for the friction tests that run against both stores (one server per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_servers import RedisServer, start_server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(Path(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()
