"""Lean connections to the primaries of a Redis Cluster, found by hash slot.

redis-py's ``RedisCluster`` costs the gateway several hundred µs of CPU per quota charge (a
request's limits usually live in different slots, so each is a separate script call through
its pool, its command parser and its redirection logic). Script calls of the quota store and
of the risk signal store go instead over one lean pipelined connection per primary
(:class:`~gateway.store.resp.RespConnection`), picked by slot from redis-py's own slot map.
redis-py keeps everything else: the slot map itself, ``MOVED``/``ASK`` redirections, failovers
and every non-script command.

When the lean path sees a redirection or a connection failure, the slot map may be stale: the
routes go *cold* and every script call takes redis-py's path (which follows the redirection and
refreshes its map) until one of them succeeds, after which slots are resolved again from the
fresh map. A redirection means Redis did not run the script, so that call is retried once
through redis-py; a connection failure or a deadline is ambiguous (the script may have run) and
is never retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError

from gateway.store.resp import RespConnection, RespProtocol, lean_for

SLOTS = 16384
# Error replies after which the slot map is stale and Redis did not run the command.
_REDIRECTS = ("MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN")


def cluster_client(urls: Sequence[str], *, max_connections: int, connect_timeout: float) -> RedisCluster:
    """A ``RedisCluster`` from startup-node URLs (``redis://`` or ``rediss://``, credentials
    and ``ssl_*`` query options as redis-py reads them), without client-side retries: a resent
    script could count a request twice. The nodes it discovers are reached with the same
    credentials and TLS settings, so the URLs must agree on them (:func:`cluster_url_issue`)."""
    options = _shared_options(urls[0])
    nodes = [ClusterNode(str(parsed.get("host", "localhost")), int(parsed.get("port", 6379)))
             for parsed in (parse_url(url) for url in urls)]
    return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 0), max_connections=max_connections,
                        socket_connect_timeout=connect_timeout, **options)


def cluster_url_issue(urls: Sequence[str]) -> str | None:
    """What is wrong with a list of startup-node URLs, or None."""
    first: dict[str, Any] | None = None
    for url in urls:
        shown = _redacted(url)  # config errors are logged: never with the password
        try:
            parsed = parse_url(url)
        except ValueError as exc:
            return f"{shown!r}: {exc}"
        if parsed.get("path") is not None:
            return f"{shown!r}: a Redis Cluster is reached over TCP (redis:// or rediss://), not a socket"
        if parsed.get("db", 0):
            return f"{shown!r}: a Redis Cluster has only database 0"
        options = _shared_options(url)
        if first is None:
            first = options
        elif options != first:
            return "the startup node URLs must share one scheme, user, password and ssl_* options"
    return None


def _redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _shared_options(url: str) -> dict[str, Any]:
    """What every node of one cluster is reached with: credentials and TLS."""
    parsed = parse_url(url)
    options: dict[str, Any] = {k: v for k, v in parsed.items() if k in ("username", "password")
                               or k.startswith("ssl_")}
    if parsed.get("connection_class") is SSLConnection:
        options["ssl"] = True
    return options


def redirected(error: ResponseError) -> bool:
    """An error reply that means "not run here, ask the cluster again"."""
    return str(error).startswith(_REDIRECTS)


class ClusterRoutes:
    """Slot → lean connection to the primary serving it (see the module docstring)."""

    def __init__(self, client: RedisCluster, deadline: float, on_connect: Sequence[bytes],
                 on_new: Callable[[RespConnection], None] | None = None) -> None:
        self._client = client
        self._on_new = on_new  # told of each primary's connection when made (before it connects)
        self._deadline = deadline
        self._on_connect = list(on_connect)
        self._by_slot: list[RespConnection | None] = [None] * SLOTS
        self._by_node: dict[tuple[str, int], RespConnection] = {}
        # Cold until redis-py has answered once (it builds its slot map on first use), and again
        # after a redirection or a connection failure on the lean path.
        self.cold = True
        self.redirects = 0  # lean calls answered with a redirection (then sent through redis-py)

    def connection(self, slot: int) -> RespConnection | None:
        """The lean connection for ``slot``; None: use redis-py (cold, or the node is not plain
        TCP with RESP2 and a static password)."""
        conn = self._by_slot[slot]
        if conn is not None or self.cold:
            return conn
        return self._resolve(slot)

    def _resolve(self, slot: int) -> RespConnection | None:
        try:
            node = self._client.nodes_manager.get_node_from_slot(slot)
        except RedisClusterException:  # not covered (yet): redis-py will say why
            return None
        address = (node.host, int(node.port))
        conn = self._by_node.get(address)
        if conn is None:
            made = lean_for(node.connection_class, {**node.connection_kwargs, "db": 0}, self._deadline,
                            self._on_connect)
            if made is None:  # not plain TCP or TLS with RESP2 and a static password: redis-py only
                return None
            conn = self._by_node[address] = made
            if self._on_new is not None:
                self._on_new(conn)
        self._by_slot[slot] = conn
        return conn

    def forget(self) -> None:
        """The slot map may have changed: use redis-py until it has answered again."""
        self.cold = True
        self._by_slot = [None] * SLOTS

    def ready(self, slots: Iterable[int]) -> list[RespProtocol] | None:
        """The live connection of each slot's primary, in order; None if one is not connected
        yet (or the routes are cold): the caller takes the awaited path, which connects."""
        if self.cold:
            return None
        protos: list[RespProtocol] = []
        for slot in slots:
            conn = self.connection(slot)
            proto = None if conn is None else conn.ready
            if proto is None:
                return None
            protos.append(proto)
        return protos

    def failed(self, error: BaseException) -> bool:
        """A lean call failed with ``error``: whether it did not run and may be sent again the
        awaited way (NOSCRIPT: after a script load; a redirection: through redis-py). A
        redirection or a connection failure makes the routes cold; a deadline changes nothing
        (the script may have run)."""
        if isinstance(error, NoScriptError):
            return True
        if isinstance(error, ResponseError):
            if not redirected(error):
                return False
            self.redirects += 1
            self.forget()  # not run: redis-py follows the redirection and refreshes its map
            return True
        if isinstance(error, (RedisConnectionError, OSError)):
            self.forget()  # a failover may have moved the slot
        return False

    def warm(self) -> None:
        """redis-py answered a call: its slot map is current enough to route by."""
        self.cold = False

    @property
    def connections(self) -> int:
        """Lean connections opened so far, over all primaries (stats and tests)."""
        return sum(conn.connects for conn in self._by_node.values())

    async def close(self) -> None:
        for conn in self._by_node.values():
            await conn.close()
        self._by_node.clear()
        self.forget()


async def replies_of(protos: Sequence[RespProtocol], calls: Sequence[bytes], deadline: float,
                     abandoned: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Send each packed call on its connection, every one written before any reply is awaited
    (one round-trip time for all), and return the replies in order, a failed call's exception in
    its place (for the caller to judge with :meth:`ClusterRoutes.failed`). Replies nobody will
    act on go to ``abandoned(index, reply)``: a call past its deadline (when its reply comes)
    and, if the caller is cancelled, every call (the answered ones at once). Without it, such
    replies are dropped (``RespProtocol.watch``)."""
    futs = [proto.send(call, deadline) for proto, call in zip(protos, calls, strict=True)]
    replies: list[Any] = []
    for at, fut in enumerate(futs):
        try:
            replies.append(await fut)
        except asyncio.CancelledError:
            if abandoned is None:
                for proto, left in zip(protos[at:], futs[at:], strict=True):
                    if not left.done():
                        proto.watch(left)
                raise
            for i, reply in enumerate(replies):
                if not isinstance(reply, TimeoutError):  # (those were claimed when they timed out)
                    abandoned(i, reply)
            for i in range(at, len(futs)):
                protos[i].claim_late(futs[i], partial(abandoned, i))
            raise
        except TimeoutError as exc:
            if abandoned is not None:
                protos[at].claim_late(fut, partial(abandoned, at))
            replies.append(exc)
        except Exception as exc:  # noqa: BLE001 (each call's outcome is judged by the caller)
            replies.append(exc)
    return replies


async def routed_call(routes: ClusterRoutes, slot: int, packed: bytes,
                      through_client: Callable[[], Awaitable[Any]]) -> Any:
    """One packed script call on the lean connection of ``slot``'s primary, or through redis-py
    (``through_client``) while the routes are cold and after a redirection. NOSCRIPT and every
    other error go to the caller (a connection failure also makes the routes cold)."""
    conn = routes.connection(slot)
    if conn is not None:
        try:
            return await conn.call(packed)
        except Exception as exc:
            if isinstance(exc, NoScriptError) or not routes.failed(exc):
                raise
    reply = await through_client()
    routes.warm()
    return reply
