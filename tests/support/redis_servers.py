"""Start real ``redis-server`` processes (single and a 3-master cluster) for tests.

Servers run with persistence off in a temporary directory, on free ports, and can be killed and
restarted on the same port for fault tests. Without a ``redis-server`` binary the tests skip,
unless ``GATEWAY_REQUIRE_REDIS=1`` (CI), where a missing binary is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.tls import TlsFiles


def require_redis(*binaries: str) -> None:
    """Skip (or fail under GATEWAY_REQUIRE_REDIS=1) when a binary is missing."""
    for binary in binaries or ("redis-server",):
        if shutil.which(binary) is None:
            reason = f"{binary} not found on PATH"
            if os.environ.get("GATEWAY_REQUIRE_REDIS") == "1":
                pytest.fail(f"{reason} and GATEWAY_REQUIRE_REDIS=1")
            pytest.skip(reason)


def free_port(bus: bool = False, following: int = 0) -> int:
    """A free TCP port on 127.0.0.1; with ``bus``, port + 10000 free too (a cluster bus); with
    ``following``, that many ports after it free too (one admin port per worker)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        also = [port + 10000] if bus else []
        also += [port + i for i in range(1, following + 1)]
        if all(_bindable(p) for p in also):
            return port
    raise RuntimeError("no free port found")


def _bindable(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ping(port: int, password: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            if password:
                s.sendall(b"AUTH %s\r\n" % password.encode())
                if not s.recv(16).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One redis-server process; ``kill``/``restart`` keep the port (state is lost)."""

    workdir: Path
    port: int = 0
    extra: Sequence[str] = ()
    password: str | None = None  # requirepass (and masterauth), when set
    tls_port: int = 0  # also served over TLS on this port, when set (see start_cluster)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no",
             *(("--requirepass", self.password, "--masterauth", self.password) if self.password else ()),
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping(self.port, self.password):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(workdir: Path) -> RedisServer:
    require_redis()
    server = RedisServer(workdir, free_port())
    server.start()
    return server


@dataclass
class RedisClusterServers:
    """Three masters, no replicas, slots split by ``redis-cli --cluster create``."""

    nodes: list[RedisServer]
    tls: TlsFiles | None = None  # nodes also served over TLS, the cluster bus too

    @property
    def tls_urls(self) -> list[str]:
        """``rediss://`` startup URLs trusting the test CA (a cluster started with ``tls``)."""
        assert self.tls is not None
        return [f"rediss://127.0.0.1:{n.tls_port}/0?ssl_ca_certs={self.tls.ca}" for n in self.nodes]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def owner(self, slot: int) -> int:
        """Index of the node serving ``slot``."""
        for start, end, primary, *_ in self.command(0, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(i for i, n in enumerate(self.nodes) if n.port == int(primary[1]))
        raise AssertionError(f"slot {slot} not served")

    def move_slot(self, slot: int, to: int) -> None:
        """Migrate ``slot`` and its keys to node ``to``, as a resharding does (every node is
        told at the end, so the move is immediate and complete)."""
        source = self.owner(slot)
        source_id, target_id = self.command(source, "CLUSTER", "MYID"), self.command(to, "CLUSTER", "MYID")
        self.command(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            password = self.nodes[to].password
            auth = ("AUTH", password) if password else ()
            self.command(source, "MIGRATE", "127.0.0.1", self.nodes[to].port, "", 0, 5000, *auth,
                         "KEYS", *keys)
        for i in range(len(self.nodes)):
            self.command(i, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def command(self, node: int, *args: str | int) -> Any:
        """One command to node ``node`` (its password included)."""
        return node_command(self.nodes[node].port, *args, password=self.nodes[node].password)


def node_command(port: int, *args: str | int, password: str | None = None) -> Any:
    """One command to one server on 127.0.0.1 (admin commands of the fault tests)."""
    with redis.Redis(port=port, password=password, decode_responses=True) as client:
        return client.execute_command(*args)


def start_cluster(workdir: Path, masters: int = 3, timeout: float = 30.0,
                  password: str | None = None, tls: TlsFiles | None = None) -> RedisClusterServers:
    """With ``tls``, every node also serves TLS on its ``tls_port`` and the cluster bus is TLS
    (its port is then ``tls_port`` + 10000); set-up and admin commands use the plaintext port."""
    require_redis("redis-server", "redis-cli")
    nodes: list[RedisServer] = []
    auth = ("--no-auth-warning", "-a", password) if password else ()
    try:
        for i in range(masters):
            port = free_port(bus=True)
            tls_port = free_port(bus=True) if tls else 0
            tls_args = () if tls is None else (
                "--tls-port", str(tls_port), "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no", "--tls-cluster", "yes")
            node = RedisServer(workdir / f"node{i}", port, (
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000", *tls_args), password, tls_port)
            node.start()
            nodes.append(node)
        subprocess.run(
            ["redis-cli", *auth, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        deadline = time.monotonic() + timeout
        for node in nodes:
            while b"cluster_state:ok" not in subprocess.run(
                    ["redis-cli", *auth, "-p", str(node.port), "cluster", "info"],
                    capture_output=True, timeout=5).stdout:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis cluster did not become ready")
                time.sleep(0.05)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return RedisClusterServers(nodes, tls)
