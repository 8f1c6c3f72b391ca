"""The stores over TLS (``rediss://``) against a real TLS redis-server: the lean connection speaks
TLS with the certificates and checks redis-py would use, and never falls back to plaintext."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.risk.redis_sigstore import RedisSignalStore
from gateway.risk.sigstore import HllAdd
from gateway.store.base import Adjustment, Algorithm, Charge, StoreError
from gateway.store.redis import RedisStore
from tests.support.redis_servers import RedisServer, free_port, node_command, require_redis, start_cluster
from tests.support.tls import TlsFiles, make_tls_files

pytestmark = pytest.mark.redis


@dataclass
class TlsRedis:
    server: RedisServer  # also answers in plaintext on server.port (the tests' admin port)
    tls_port: int
    files: TlsFiles

    def url(self, ca: Path | None = None) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={ca or self.files.ca}"


def _built_with_tls() -> bool:
    """Whether redis-server knows the TLS directives (a build option: Debian's package has it)."""
    probe = subprocess.run(["redis-server", "--port", "0", "--tls-port", "0", "--tls-cert-file", "/none"],
                           capture_output=True, text=True, timeout=10)
    return "Bad directive" not in probe.stdout + probe.stderr


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    files = make_tls_files(tmp_path / "tls")
    require_redis()
    if not _built_with_tls():
        pytest.skip("this redis-server was built without TLS")
    tls_port = free_port()
    server = RedisServer(tmp_path / "redis", free_port(), (
        "--tls-port", str(tls_port), "--tls-cert-file", str(files.cert), "--tls-key-file", str(files.key),
        "--tls-ca-cert-file", str(files.ca), "--tls-auth-clients", "no"))
    server.start()
    yield TlsRedis(server, tls_port, files)
    server.stop()


def window(key: str, n: int, cost: int = 1) -> Charge:
    return Charge(key, Algorithm.WINDOW, n, 60_000, cost)


def tls_clients(redis: TlsRedis) -> int:
    """Clients connected on the TLS port."""
    listing = node_command(redis.server.port, "CLIENT", "LIST")
    return sum(f"laddr=127.0.0.1:{redis.tls_port}" in line for line in listing.splitlines())


async def test_quota_store_over_tls_uses_the_lean_connection(tls_redis: TlsRedis) -> None:
    store = RedisStore.from_url(tls_redis.url(), deadline=2.0)
    try:
        assert store.reconcile is not None  # the lean connection (and its deferred reconciles)
        results = [await store.charge([window("tls", 3, 2)]) for _ in range(2)]
        assert [r.allowed for r in results] == [True, False]  # 2 + 2 > 3
        outcomes: list[StoreError | None] = []
        assert store.adjust_soon([Adjustment(results[0].receipts[0], -1)], outcomes.append)
        for _ in range(100):
            if outcomes:
                break
            await asyncio.sleep(0.01)
        assert outcomes == [None]
        assert (await store.charge([window("tls", 3, 2)])).allowed  # 1 + 2 <= 3 after the refund
        assert tls_clients(tls_redis) >= 1
    finally:
        await store.close()


async def test_an_untrusted_certificate_is_refused(tls_redis: TlsRedis, tmp_path: Path) -> None:
    """A server whose certificate the configured CA did not sign gets no request, and nothing
    falls back to plaintext."""
    stranger = make_tls_files(tmp_path / "other", authority="someone else's CA")
    store = RedisStore.from_url(tls_redis.url(ca=stranger.ca), deadline=2.0)
    try:
        with pytest.raises(StoreError):
            await store.charge([window("tls-refused", 3)])
        assert tls_clients(tls_redis) == 0
    finally:
        await store.close()


async def test_signal_store_over_tls(tls_redis: TlsRedis) -> None:
    store = RedisSignalStore.from_url(tls_redis.url(), prefix="t:tls:", deadline=2.0)
    try:
        assert store._lean is not None
        results = [(await store.batch([HllAdd("acct", f"m{i}", 60.0)])).results for i in range(3)]
        assert [list(r) for r in results] == [[1], [2], [3]]
    finally:
        await store.close()


@pytest.mark.cluster
async def test_cluster_over_tls_uses_lean_connections(tmp_path: Path) -> None:
    """A Cluster whose nodes (and bus) speak TLS: redis-py discovers the nodes' TLS ports, and
    the primaries' lean connections reach them over TLS with the same CA."""
    require_redis("redis-server", "redis-cli")
    if not _built_with_tls():
        pytest.skip("this redis-server was built without TLS")
    cluster = start_cluster(tmp_path / "cluster", tls=make_tls_files(tmp_path / "tls"))
    store = RedisStore.from_url(cluster.tls_urls, cluster=True, deadline=2.0)
    try:
        results = [await store.charge([window("tls-a", 3), window("tls-b", 3)]) for _ in range(4)]
        assert [r.allowed for r in results] == [True, True, True, False]
        routes = store.routes
        assert routes is not None and not routes.cold and routes.connections >= 1
        on_tls = sum(f"laddr=127.0.0.1:{n.tls_port}" in line for n in cluster.nodes
                     for line in node_command(n.port, "CLIENT", "LIST").splitlines())
        assert on_tls >= routes.connections
    finally:
        await store.close()
        cluster.stop()
