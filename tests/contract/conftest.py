"""Fixtures for store contract tests: real Redis servers and one harness per backend.

``harness`` runs a test against MemoryStore (fake clock: ``advance`` moves it) and against a
real single Redis and a real 3-master Redis Cluster (``advance`` really sleeps: Redis owns
the TTLs and the time, so those tests use short windows).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.store.base import Store
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.clock import FakeClock
from tests.support.redis_servers import (
    RedisClusterServers,
    RedisServer,
    start_cluster,
    start_server,
)

# Generous in tests: the 50 ms production deadline is exercised by dedicated tests, and a
# loaded 2-core CI box must not turn the contract suite into a deadline test.
TEST_DEADLINE = 2.0


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One shared redis-server for the session (tests flush it before use)."""
    server = start_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One shared 3-master cluster for the session."""
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Private servers for fault tests (kill/restart); all stopped at the end of the test."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = start_server(tmp_path / f"redis{len(servers)}")
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_server.url, deadline=TEST_DEADLINE)
    await store.client.flushall()
    yield store
    await store.close()


@pytest.fixture
async def cluster_store(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_cluster.urls, cluster=True, deadline=TEST_DEADLINE)
    await store.client.flushall()
    yield store
    await store.close()


@dataclass
class StoreHarness:
    kind: str  # "memory" | "redis" | "cluster"
    store: Store
    advance: Callable[[float], Awaitable[None]]


@pytest.fixture(params=[
    "memory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.cluster]),
])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[StoreHarness]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        yield StoreHarness("memory", MemoryStore(clock), advance)
        return
    # Sync session fixtures only: an async fixture cannot be requested from an async fixture.
    if request.param == "redis":
        store = RedisStore.from_url(request.getfixturevalue("redis_server").url, deadline=TEST_DEADLINE)
    else:
        store = RedisStore.from_url(request.getfixturevalue("redis_cluster").urls, cluster=True,
                                    deadline=TEST_DEADLINE)
    await store.client.flushall()
    yield StoreHarness(request.param, store, asyncio.sleep)
    await store.close()


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.cluster)])
async def any_redis_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A flushed RedisStore on the single server, then on the cluster."""
    if request.param == "redis":
        store = RedisStore.from_url(request.getfixturevalue("redis_server").url, deadline=TEST_DEADLINE)
    else:
        store = RedisStore.from_url(request.getfixturevalue("redis_cluster").urls, cluster=True,
                                    deadline=TEST_DEADLINE)
    await store.client.flushall()
    yield store
    await store.close()
