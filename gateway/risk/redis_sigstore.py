"""``RedisSignalStore``: a request's signal operations in one ``EVALSHA`` (one round trip).

Time is Redis ``TIME``, so replicas with skewed clocks agree. Keys are hash-tagged
(``prefix{base}``) so every Redis key of one logical key (a HyperLogLog's buckets and its union
view) shares a slot.

Single Redis (the hot path): the script goes out packed by hiredis on the lean pipelined
connection of :mod:`gateway.store.resp` (an asyncio Protocol; no redis-py pool checkout, health
check, stream reader or per-call ``asyncio.timeout``: most of the client's CPU per call before).
Unix sockets, credential providers and RESP3 fall back to redis-py (TLS does not).

Redis Cluster (``cluster=True``): one script call must stay in one slot, and a request's keys
(account, ip, prefix, ASN, template) hash to different slots. The operations are grouped by slot
and each group is one ``EVALSHA`` (on the lean connection of the slot's primary, routed by
redis-py's slot map: :mod:`gateway.store.cluster`), all sent concurrently
(one round-trip time); results are put back in operation order. Every operation touches only its
own key, so splitting a batch changes no result; the batch is then atomic per slot, not as a
whole, which no signal relies on. ``BatchResult.now`` is the earliest of the groups' ``TIME``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import struct
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from hiredis import pack_command
from redis.asyncio import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.risk.sigstore import (
    AccountState,
    AccountTouch,
    BatchResult,
    DecayAdd,
    HllAdd,
    Op,
    StateGet,
    StatePut,
)
from gateway.store.base import StoreError
from gateway.store.cluster import ClusterRoutes, cluster_client, replies_of, routed_call
from gateway.store.resp import RespConnection, RespProtocol, lean_connection, pack


def _encode(ops: Sequence[Op]) -> list[str | float | int]:
    """The script's ARGV for ``ops``. An HLL add or decaying sum whose parameters are those of the
    previous one of its kind goes as one letter ('H', 'D'): a request adds its one entity to every
    HyperLogLog and the same (1, evidence) to every decaying sum, so this halves the arguments to
    convert and send and that the script turns into Lua values. Amounts repeat only as the same
    tuple object (``plan`` builds one per request): equal tuples of different objects are sent in
    full, which is merely longer."""
    args: list[str | float | int] = []
    member: str | None = None
    window = half_life = math.nan  # equal to nothing: the first of each kind is sent in full
    amounts: tuple[float, ...] | None = None
    for op in ops:
        if isinstance(op, HllAdd):
            if op.member == member and op.window == window:
                args.append("H")
            else:
                member, window = op.member, op.window
                args += ("h", member, window)
        elif isinstance(op, DecayAdd):
            if op.amounts is amounts and op.half_life == half_life:
                args.append("D")
            else:
                amounts, half_life = op.amounts, op.half_life
                args += ("d", half_life, len(amounts), *amounts)
        elif isinstance(op, AccountTouch):
            args += ("a", op.ttl, op.half_life, op.template, len(op.amounts), *op.amounts)
        elif isinstance(op, StateGet):
            args.append("g")
        elif isinstance(op, StatePut):
            args += ("p", op.field, op.value, op.ttl)
        else:
            args += ("x", op.field or "")
    return args


def _text(value: Any) -> str:
    return value.decode() if type(value) is bytes else str(value)


_ACCOUNT = struct.Struct("<9d")  # last, first, gap mean, gap var, gaps, hours, hours start, top count, n
_DOUBLE = struct.Struct("<d")
_PAIR = struct.Struct("<2d")  # (count, sum): every decaying sum of the risk stage


@functools.cache
def _doubles(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}d")


def _account(old: bytes, new: bytes) -> AccountState:
    """The account's stored string after the touch (see signals.lua); ``old`` is the one before it
    (empty for a new account), whose first double is the previous request's time."""
    _last, first, gm, gv, gk, hours, start, tc, n = _ACCOUNT.unpack_from(new)
    count = int(n)
    end = _ACCOUNT.size + 8 * count
    return AccountState(_DOUBLE.unpack_from(old)[0] if old else None, first,
                        _doubles(count).unpack_from(new, _ACCOUNT.size), gm, gv, int(gk), int(hours),
                        new[end:].decode(), tc, start)


def _decode(ops: Sequence[Op], raw: list[Any]) -> BatchResult:
    """The script's reply: ``TIME`` (seconds, microseconds: the script's own arithmetic gives the
    same double), then per operation an integer, packed doubles (decaying sums, account state:
    read with ``struct``, no float parsing) or the friction state's fields."""
    now = int(raw[0]) + int(raw[1]) / 1000000
    pos = 2
    results: list[Any] = []
    append = results.append
    for op in ops:  # the two common kinds first, by exact type (cheaper than isinstance)
        kind = type(op)
        if kind is HllAdd:
            append(raw[pos])
            pos += 1
        elif kind is DecayAdd:
            append(_PAIR.unpack_from(raw[pos], 8) if len(op.amounts) == 2  # type: ignore[union-attr]
                   else _doubles(len(op.amounts)).unpack_from(raw[pos], 8))  # type: ignore[union-attr]
            pos += 1  # (the sums follow the time of the add)
        elif isinstance(op, HllAdd):
            append(raw[pos])
            pos += 1
        elif isinstance(op, DecayAdd):
            append(_doubles(len(op.amounts)).unpack_from(raw[pos], 8))
            pos += 1
        elif isinstance(op, AccountTouch):
            append(_account(raw[pos], raw[pos + 1]))
            pos += 2
        elif isinstance(op, StateGet):
            count = raw[pos]
            pairs = [_text(v) for v in raw[pos + 1:pos + 1 + 2 * count]]
            append(dict(zip(pairs[::2], pairs[1::2], strict=True)))
            pos += 1 + 2 * count
        else:
            append(None)
    return BatchResult(now, tuple(results))


def _resent(done: Callable[[BatchResult | StoreError], None], task: asyncio.Future[BatchResult]) -> None:
    if task.cancelled():
        done(StoreError("risk signal store: closed"))
        return
    exc = task.exception()
    if exc is None:
        done(task.result())
    else:
        done(exc if isinstance(exc, StoreError) else StoreError(f"risk signal store: {exc!r}"))


class RedisSignalStore:
    """:class:`~gateway.risk.sigstore.SignalStore` over a ``redis.asyncio`` ``Redis`` or
    ``RedisCluster`` client (see the module docstring for the hot path and the Cluster split)."""

    def __init__(self, client: aioredis.Redis | RedisCluster, *, prefix: str = "tg:risk:",
                 deadline: float = 0.05, owns_client: bool = False, lean: bool = True) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._prefix = prefix
        self._deadline = deadline
        self._owns = owns_client
        self._script = resources.files("gateway.risk").joinpath("signals.lua").read_text(encoding="utf-8")
        self._sha = hashlib.sha1(self._script.encode()).hexdigest()
        load = [pack("SCRIPT", "LOAD", self._script)]
        self._lean = lean_connection(client, deadline, load) if lean else None
        # A Cluster: each slot's EVALSHA on its primary's lean connection (gateway/store/cluster.py)
        self._routes = ClusterRoutes(client, deadline, load) if lean and isinstance(client, RedisCluster) \
            else None
        self.script_reloads = 0
        self._ready = False

    @classmethod
    def from_url(cls, url: str | Sequence[str], *, cluster: bool = False, deadline: float = 0.05,
                 max_connections: int = 256, **kwargs: Any) -> RedisSignalStore:
        """Single Redis from one URL, or a Cluster from one or more startup-node URLs."""
        # No client-side retries: a re-sent batch would count a request twice.
        urls = [url] if isinstance(url, str) else list(url)
        connect_timeout = max(deadline, 0.5)
        client: aioredis.Redis | RedisCluster
        if cluster:
            client = cluster_client(urls, max_connections=max_connections, connect_timeout=connect_timeout)
        else:
            client = aioredis.Redis.from_url(urls[0], retry=Retry(NoBackoff(), 0),
                                             max_connections=max_connections,
                                             socket_connect_timeout=connect_timeout)
        return cls(client, owns_client=True, deadline=deadline, **kwargs)

    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        prefix = self._prefix
        keys = [f"{prefix}{{{op.key}}}" for op in ops]
        lean = self._lean
        try:
            if lean is not None:
                return _decode(ops, await self._lean_eval(lean, self._packed(ops, keys)))
            async with asyncio.timeout(self._deadline):
                if not self._cluster:
                    return await self._group(ops, keys)
                return await self._slots(ops, keys)
        except (RedisError, RedisClusterException, TimeoutError, OSError) as exc:
            raise StoreError(f"risk signal store: {exc!r}") from exc

    def send_soon(self, ops: Sequence[Op], done: Callable[[BatchResult | StoreError], None]) -> bool:
        """Send ``ops`` without awaiting: ``done`` gets the result or the ``StoreError`` once Redis
        answered. Only on a connected lean connection (False otherwise: use :meth:`batch`); a
        NOSCRIPT reply (scripts flushed) goes the awaited way, which reloads the script. Saves the
        task a queued write would otherwise need (``gateway/risk/behind.py``)."""
        lean = self._lean
        proto = lean.ready if lean is not None else None
        if proto is None:
            return False
        prefix = self._prefix
        fut = proto.send(self._packed(ops, [f"{prefix}{{{op.key}}}" for op in ops]), self._deadline)
        fut.add_done_callback(functools.partial(self._answered, ops, done))
        return True

    def _packed(self, ops: Sequence[Op], keys: list[str]) -> bytes:
        """The batch as one EVALSHA in RESP (hiredis' packer), for the lean connection."""
        command: tuple[Any, ...] = ("EVALSHA", self._sha, len(keys), *keys, *_encode(ops))
        return bytes(pack_command(command))

    def _answered(self, ops: Sequence[Op], done: Callable[[BatchResult | StoreError], None],
                  fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            done(StoreError("risk signal store: closed"))
            return
        exc = fut.exception()
        if exc is None:
            done(_decode(ops, fut.result()))
        elif isinstance(exc, NoScriptError):
            asyncio.ensure_future(self.batch(ops)).add_done_callback(functools.partial(_resent, done))
        else:
            done(StoreError(f"risk signal store: {exc!r}"))

    async def _lean_eval(self, lean: RespConnection, packed: bytes) -> Any:
        """EVALSHA on the lean connection under one deadline, NOSCRIPT reload included."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._deadline
        try:
            return await lean.call(packed, self._deadline)
        except NoScriptError:  # a restart, SCRIPT FLUSH or a failover to a replica without it
            self.script_reloads += 1
            await lean.call(pack("SCRIPT", "LOAD", self._script), until - loop.time())
            return await lean.call(packed, until - loop.time())

    async def _group(self, ops: Sequence[Op], keys: list[str]) -> BatchResult:
        """One EVALSHA (all keys in one slot, or a single Redis): on a Cluster primary's lean
        connection unless its slot or primary is cold, else through redis-py."""
        args = _encode(ops)
        try:
            raw = await self._evalsha(keys, args)
        except NoScriptError:
            self.script_reloads += 1
            await self._client.script_load(self._script)  # a Cluster: on every primary
            raw = await self._evalsha(keys, args)
        return _decode(ops, raw)

    async def _evalsha(self, keys: list[str], args: Sequence[Any]) -> Any:
        routes = self._routes
        if routes is None or not keys:
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)
        packed = bytes(pack_command(("EVALSHA", self._sha, len(keys), *keys, *args)))
        return await routed_call(routes, key_slot(keys[0].encode()), packed,
                                 lambda: self._client.evalsha(self._sha, len(keys), *keys, *args))

    async def _slots(self, ops: Sequence[Op], keys: list[str]) -> BatchResult:
        """Redis Cluster: one EVALSHA per slot, concurrently; results back in op order."""
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(key_slot(key.encode()), []).append(i)
        if len(by_slot) <= 1:
            return await self._group(ops, keys)
        groups = list(by_slot.values())
        routes = self._routes
        protos = None if routes is None else routes.ready(by_slot)
        if routes is not None and protos is not None:  # all primaries connected: the lean way
            parts = await self._send_groups(routes, protos, ops, keys, by_slot, groups)
        else:
            if not self._ready:  # concurrent first calls race redis-py's cluster set-up: one goes first
                await self._client.initialize()
                self._ready = True
            parts = await asyncio.gather(*(self._group([ops[i] for i in g], [keys[i] for i in g])
                                           for g in groups))
        results: list[Any] = [None] * len(ops)
        for group, part in zip(groups, parts, strict=True):
            for i, value in zip(group, part.results, strict=True):
                results[i] = value
        return BatchResult(min(part.now for part in parts), tuple(results))

    async def _send_groups(self, routes: ClusterRoutes, protos: list[RespProtocol], ops: Sequence[Op],
                           keys: list[str], slots: Iterable[int], groups: list[list[int]]
                           ) -> list[BatchResult]:
        """Each slot's EVALSHA on its primary's connection, all written first, then awaited in
        turn; a group answered with NOSCRIPT or a redirection goes the awaited way (it did not run)."""
        subs = [([ops[i] for i in g], [keys[i] for i in g]) for g in groups]
        replies = await replies_of(protos, [self._packed(sub_ops, sub_keys) for sub_ops, sub_keys in subs],
                                   self._deadline)
        parts: list[BatchResult] = []
        for slot, (sub_ops, sub_keys), raw in zip(slots, subs, replies, strict=True):
            if not isinstance(raw, Exception):
                parts.append(_decode(sub_ops, raw))
            elif routes.failed(raw, slot):
                parts.append(await self._group(sub_ops, sub_keys))
            else:
                raise raw
        return parts

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        if self._routes is not None:
            await self._routes.close()
        if self._owns:
            await self._client.aclose()
