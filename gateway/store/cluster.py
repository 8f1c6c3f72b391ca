"""Lean connections to the primaries of a Redis Cluster, found by hash slot.

redis-py's ``RedisCluster`` costs the gateway several hundred µs of CPU per quota charge (a
request's limits usually live in different slots, so each is a separate script call through
its pool, its command parser and its redirection logic). Script calls of the quota store and
of the risk signal store go instead over one lean pipelined connection per primary
(:class:`~gateway.store.resp.RespConnection`), picked by slot from redis-py's own slot map.
redis-py keeps everything else: the slot map itself, ``MOVED``/``ASK`` redirections, failovers
and every non-script command.

Coldness is per primary. A connection failure on a primary's lean connection (it is down, or
failing over) or a ``CLUSTERDOWN`` answer from it makes that primary *cold*: calls for its slots
take redis-py's path (which reconnects, follows ``MOVED`` to a promoted replica and refreshes its
map) until one of them succeeds, after which those slots are resolved again from the fresh map.
The other primaries stay on their lean connections throughout. A ``MOVED``/``ASK``/``TRYAGAIN``
answer concerns one slot (a resharding, a failover seen slot by slot) and makes only that slot
cold, the same way. Every redirection, ``CLUSTERDOWN`` included, means Redis did not run the
script, so that call is sent again once through redis-py; a connection failure or a deadline is
ambiguous (the script may have run) and is never resent.
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
        # Resolved slots of primaries that are not cold; None: resolve from redis-py's map (which
        # has none until redis-py's first call builds it: until then every call goes through it).
        self._by_slot: list[RespConnection | None] = [None] * SLOTS
        self._by_node: dict[tuple[str, int], RespConnection] = {}
        # Cold primaries (connection failure, CLUSTERDOWN) and cold slots (a redirection): not
        # resolved until a call through redis-py for one of their slots has succeeded.
        self._cold_nodes: set[tuple[str, int]] = set()
        self._cold_slots: set[int] = set()
        self.redirects = 0  # lean calls answered with a redirection (then sent through redis-py)
        self.client_calls = 0  # script calls sent through redis-py by routed_call (stats and tests)

    def connection(self, slot: int) -> RespConnection | None:
        """The lean connection for ``slot``; None: use redis-py (the slot or its primary is
        cold, the map is not built yet, or the node is not plain TCP with RESP2 and a static
        password)."""
        conn = self._by_slot[slot]
        return conn if conn is not None else self._resolve(slot)

    def _resolve(self, slot: int) -> RespConnection | None:
        if slot in self._cold_slots:
            return None
        try:
            node = self._client.nodes_manager.get_node_from_slot(slot)
        except RedisClusterException:  # not covered (yet): redis-py will say why
            return None
        address = (node.host, int(node.port))
        if address in self._cold_nodes:
            return None
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

    def ready(self, slots: Iterable[int]) -> list[RespProtocol] | None:
        """The live connection of each slot's primary, in order; None if one is cold or not
        connected yet: the caller takes the awaited path, which connects (or uses redis-py)."""
        by_slot = self._by_slot
        protos: list[RespProtocol] = []
        for slot in slots:
            conn = by_slot[slot]
            if conn is None:
                conn = self._resolve(slot)
                if conn is None:
                    return None
            proto = conn.proto
            if proto is None or proto.closed:
                return None
            protos.append(proto)
        return protos

    def failed(self, error: BaseException, slot: int) -> bool:
        """A lean call for ``slot`` failed with ``error``: whether it did not run and may be sent
        again the awaited way (NOSCRIPT: after a script load; a redirection: through redis-py). A
        redirection makes the slot cold, a connection failure or CLUSTERDOWN its primary; a
        deadline changes nothing (the script may have run, and the primary may just be slow)."""
        if isinstance(error, NoScriptError):
            return True
        if isinstance(error, ResponseError):
            if not redirected(error):
                return False
            self.redirects += 1
            if str(error).startswith("CLUSTERDOWN"):  # the node refuses every slot
                self._cool(slot)
            else:  # not run: redis-py follows the redirection and patches its map for the slot
                self._cold_slots.add(slot)
                self._by_slot[slot] = None
            return True
        if isinstance(error, (RedisConnectionError, OSError)):
            self._cool(slot)  # down or failing over: its slots may move to a replica
        return False

    def _cool(self, slot: int) -> None:
        """Make the primary ``slot`` is routed to cold (already cold, or re-routed since: nothing)."""
        conn = self._by_slot[slot]
        if conn is None:
            return
        address = next(a for a, c in self._by_node.items() if c is conn)
        self._cold_nodes.add(address)
        self._by_slot = [None if c is conn else c for c in self._by_slot]

    def warm(self, slot: int) -> None:
        """redis-py answered a call for ``slot``: that slot, and the primary serving it in
        redis-py's map, are routed lean again. Cold primaries the map no longer lists as primaries
        (demoted or gone after a failover) are dropped: they have no slot left to route."""
        if not self._cold_nodes and not self._cold_slots:
            return
        self._cold_slots.discard(slot)
        if not self._cold_nodes:
            return
        try:
            node = self._client.nodes_manager.get_node_from_slot(slot)
        except RedisClusterException:
            return
        self._cold_nodes.discard((node.host, int(node.port)))
        primaries = {(n.host, int(n.port)) for n in self._client.get_primaries()}
        if primaries:
            self._cold_nodes &= primaries

    @property
    def cold(self) -> bool:
        """Whether some primary or slot is cold (its calls go through redis-py)."""
        return bool(self._cold_nodes or self._cold_slots)

    @property
    def cold_nodes(self) -> list[str]:
        """The cold primaries as ``host:port``, sorted (readiness detail and tests)."""
        return [f"{host}:{port}" for host, port in sorted(self._cold_nodes)]

    @property
    def connections(self) -> int:
        """Lean connections opened so far, over all primaries (stats and tests)."""
        return sum(conn.connects for conn in self._by_node.values())

    async def close(self) -> None:
        for conn in self._by_node.values():
            await conn.close()
        self._by_node.clear()
        self._by_slot = [None] * SLOTS
        self._cold_nodes.clear()
        self._cold_slots.clear()


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
    (``through_client``) while the slot or its primary is cold and after a redirection. NOSCRIPT
    and every other error go to the caller (a connection failure also makes the primary cold)."""
    conn = routes.connection(slot)
    if conn is not None:
        try:
            return await conn.call(packed)
        except Exception as exc:
            if isinstance(exc, NoScriptError) or not routes.failed(exc, slot):
                raise
    routes.client_calls += 1
    reply = await through_client()
    routes.warm(slot)
    return reply
