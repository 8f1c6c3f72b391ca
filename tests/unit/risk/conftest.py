"""Real Redis servers for the risk store tests: one single server and one 3-master Cluster per
test module (started on free ports, stopped after the module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_servers import RedisClusterServers, RedisServer, start_cluster, start_server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(Path(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = start_cluster(Path(tmp_path_factory.mktemp("cluster")))
    yield cluster
    cluster.stop()
