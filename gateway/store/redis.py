"""``RedisStore``: quota and risk state in Redis or Redis Cluster, through server-side Lua.

* Scripts are addressed by SHA1 (EVALSHA); on NOSCRIPT (after a restart, failover or
  ``SCRIPT FLUSH``) the script is loaded with SCRIPT LOAD (all primaries in a Cluster) and the
  call is retried once.
* Keys are ``<prefix>{<identity>}``: the hash tag is the whole identity, so one limit lives in
  one slot. A request's limits may span slots; in a Cluster they are charged per slot
  concurrently and, if one slot denies, the slots that admitted are refunded (compensation).
  See ``docs/quotas.md`` for the bound this gives.
* Every public call runs under a deadline (default 50 ms); any failure becomes ``StoreError``.
* Client-side retries are disabled: re-sending a charge after an ambiguous connection error
  could charge twice; the circuit breaker and failure modes deal with errors instead.
* Hot path (over TCP, RESP2): scripts go out on one lean pipelined connection
  (``gateway/store/resp.py``: an asyncio Protocol, hiredis-parsed replies, replies matched to
  calls in order), skipping redis-py's pool, stream reader and per-command wrappers, which cost
  several times the wire work; in a Cluster, one such connection per primary, found by slot from
  redis-py's slot map (``gateway/store/cluster.py``). Calls are encoded and replies decoded by
  ``gateway/store/wire.py``. redis-py still serves every non-script command, a Cluster's
  redirections, and the script calls of a Cluster primary that is cold (down or failing over: the
  others stay on their lean connections).
* Concurrency leases are renewed by ``renew.lua`` (extended only while still held, never
  resurrected), batched per slot like every other call.
* A charge given up on while Redis may still run it (its deadline passed, or the request was
  cancelled: the client went away) is undone when its reply comes after all: nobody acts on that
  result, so whatever it applied is refunded (``RespProtocol.claim_late``). Only a lost
  connection leaves the outcome unknown (counted; the windows and lease TTLs bound it).
* Reconciles can be deferred (``adjust_soon``): settles queued since the lean connection's last
  write go out together in one EVALSHA (one per slot in a Cluster, on the key's primary), ahead of
  anything written after them, so the next charge always sees them
  (``gateway/store/reconcile.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from gateway.store.base import (
    Adjustment,
    Algorithm,
    Charge,
    ChargeResult,
    LimitState,
    Receipt,
    StoreError,
)
from gateway.store.cluster import ClusterRoutes, cluster_client, replies_of, routed_call
from gateway.store.reconcile import Done, Outcome, ReconcileQueue
from gateway.store.resp import LateReply, RespConnection, lean_connection, pack
from gateway.store.wire import ScriptCodec

T = TypeVar("T")

log = logging.getLogger(__name__)
RedisClient = Redis | RedisCluster

# Leases per renew.lua call: a renewal round for thousands of open streams goes out as several
# scripts (pipelined, still one round trip) so that no single script holds Redis for long.
RENEW_BATCH = 512
@dataclass(frozen=True, slots=True)
class _Script:
    body: str
    sha: str

    @classmethod
    def load(cls, name: str) -> _Script:
        body = resources.files("gateway.store").joinpath("lua", name).read_text("utf-8")
        return cls(body, hashlib.sha1(body.encode()).hexdigest())


@dataclass(slots=True)
class RedisStoreStats:
    """Counters worth exporting: cluster compensations, NOSCRIPT reloads, abandoned charges."""

    compensations: int = 0
    compensation_failures: int = 0
    script_reloads: int = 0
    # Charges given up on (deadline, cancelled request) that Redis applied after all, and were
    # refunded; refunds that failed; those whose outcome is unknown (the connection was lost).
    abandoned_refunds: int = 0
    abandoned_refund_failures: int = 0
    abandoned_unknown: int = 0


class RedisStore:
    """:class:`~gateway.store.base.Store` on a ``redis.asyncio`` ``Redis`` or ``RedisCluster``."""

    def __init__(self, client: RedisClient, *, prefix: str = "tg:", deadline: float = 0.05,
                 lean: bool = True, settle_batch: int = 128) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._prefix = prefix
        self._deadline = deadline
        self._charge = _Script.load("charge.lua")
        self._adjust = _Script.load("adjust.lua")
        self._renew = _Script.load("renew.lua")
        self.stats = RedisStoreStats()
        # RESP encoding (memoised) and reply decoding of charge.lua and adjust.lua calls
        self.codec = ScriptCodec(prefix, self._charge.sha, self._adjust.sha, self._cluster)
        scripts = (self._charge, self._adjust, self._renew)
        loads = [pack("SCRIPT", "LOAD", script.body) for script in scripts]
        self._lean = lean_connection(client, deadline, loads) if lean else None
        # A Cluster: script calls over lean connections to its primaries (gateway/store/cluster.py)
        self._routes = ClusterRoutes(client, deadline, loads, self._node_queue) \
            if lean and isinstance(client, RedisCluster) else None
        self._settle_batch = settle_batch
        self._tasks: set[asyncio.Task[None]] = set()  # refunds of abandoned charges, when not queued
        # A Cluster: one deferred-reconcile queue per primary, riding on its lean connection
        self._node_queues: dict[RespConnection, ReconcileQueue] = {}
        self._reconcile = None if self._lean is None else ReconcileQueue(
            self._lean, self.codec.pack_adjust, self._adjust_now, deadline=deadline, max_batch=settle_batch)

    @classmethod
    def from_url(cls, url: str | Sequence[str], *, cluster: bool = False, prefix: str = "tg:",
                 deadline: float = 0.05, max_connections: int = 256, **options: Any) -> RedisStore:
        """Single Redis from one URL, or a Cluster from one or more startup-node URLs."""
        urls = [url] if isinstance(url, str) else list(url)
        client: RedisClient
        if cluster:
            client = cluster_client(urls, max_connections=max_connections, connect_timeout=max(deadline, 0.5))
        else:
            client = Redis.from_url(urls[0], retry=Retry(NoBackoff(), 0), max_connections=max_connections,
                                    socket_connect_timeout=max(deadline, 0.5))
        return cls(client, prefix=prefix, deadline=deadline, **options)

    @property
    def client(self) -> RedisClient:
        return self._client

    def key(self, key: str) -> str:
        """The Redis key of a logical key (prefix + hash tag over the whole identity)."""
        return f"{self._prefix}{{{key}}}"

    # ---- plumbing -----------------------------------------------------------------------
    async def _guard(self, fn: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
        try:
            async with asyncio.timeout(self._deadline if deadline is None else deadline):
                return await fn()
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: BaseException) -> StoreError:
        """What every public call raises for a deadline or a Redis/connection failure."""
        if isinstance(exc, TimeoutError):
            return StoreError(f"store deadline of {self._deadline * 1000:.0f} ms exceeded")
        return StoreError(f"store error: {exc}")

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self._evalsha(script.sha, keys, args)
        except NoScriptError:
            self.stats.script_reloads += 1
            await self._client.script_load(script.body)
            return await self._evalsha(script.sha, keys, args)

    async def _evalsha(self, sha: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        lean = self._lean
        if lean is not None:
            return await lean.call(pack("EVALSHA", sha, len(keys), *keys, *args))
        routes = self._routes
        if routes is None or not keys:
            return await self._client.evalsha(sha, len(keys), *keys, *args)
        packed = pack("EVALSHA", sha, len(keys), *keys, *args)
        return await routed_call(routes, key_slot(keys[0].encode()), packed,
                                 lambda: self._client.evalsha(sha, len(keys), *keys, *args))

    async def _lean_eval(self, lean: RespConnection, script: _Script, packed: bytes,
                         late: LateReply | None = None) -> Any:
        """EVALSHA on the lean connection: the connection enforces the deadline (no
        ``asyncio.timeout`` per call); NOSCRIPT loads the script there and retries once, all
        within the one deadline; failures become ``StoreError`` as in :meth:`_guard`. ``late``
        gets the reply of a call given up on (see ``RespConnection.call``)."""
        until = asyncio.get_running_loop().time() + self._deadline
        try:
            try:
                return await lean.call(packed, self._deadline, late)
            except NoScriptError:
                return await self._reload_and_retry(lean, script, packed, until, late)
        except (TimeoutError, RedisError, OSError) as exc:
            raise self._store_error(exc) from exc

    async def _reload_and_retry(self, lean: RespConnection, script: _Script, packed: bytes,
                                until: float, late: LateReply | None = None) -> Any:
        """After NOSCRIPT: load the script on the lean connection and send ``packed`` again, both
        before ``until`` (loop time): the call's one deadline."""
        loop = asyncio.get_running_loop()
        self.stats.script_reloads += 1
        await lean.call(pack("SCRIPT", "LOAD", script.body), until - loop.time())
        return await lean.call(packed, until - loop.time(), late)

    # ---- quota --------------------------------------------------------------------------
    async def charge(self, charges: Sequence[Charge]) -> ChargeResult:
        if not charges:
            return ChargeResult(True, await self.now(), (), ())
        lean = self._lean
        if lean is None:
            routes = self._routes
            if routes is not None:
                return await self._charge_lean_cluster(routes, charges)
            groups = self._groups([c.key for c in charges])
            if len(groups) == 1:
                return await self._guard(lambda: self._charge_group(charges))
            return await self._guard(lambda: self._charge_slots(charges, groups))
        # Single Redis, the hot path: the reply future of the lean connection awaited here
        # directly (what _lean_eval does, without its coroutine and the connection's) while
        # the connection is up; connecting and NOSCRIPT take _lean_eval.
        packed = self.codec.pack_charge(charges)
        proto = lean.proto
        if proto is None or proto.closed:
            raw = await self._lean_eval(lean, self._charge, packed, self._undo_later(charges))
            return self.codec.charge_result(charges, raw)
        deadline = self._deadline
        until = proto.loop.time() + deadline
        fut = proto.send(packed, deadline)
        try:
            try:
                raw = await fut
            except (asyncio.CancelledError, TimeoutError):
                proto.claim_late(fut, self._undo_later(charges))
                raise
            except NoScriptError:  # flushed: load and retry once, within the same deadline
                raw = await self._reload_and_retry(lean, self._charge, packed, until,
                                                   self._undo_later(charges))
        except (TimeoutError, RedisError, OSError) as exc:
            raise self._store_error(exc) from exc
        return self.codec.charge_result(charges, raw)

    def _undo_later(self, charges: Sequence[Charge]) -> LateReply:
        """What to do with the reply of a charge given up on: refund what it applied."""
        return lambda reply: self._undo_abandoned(charges, reply)

    def _undo_abandoned(self, charges: Sequence[Charge], reply: Any) -> None:
        """A charge given up on (deadline passed, request cancelled) was answered after all.
        Nobody acted on its result: a request that timed out was decided by its failure mode, a
        cancelled one never reached the upstream. So what it applied is refunded, as if it never
        ran (a concurrency lease is released, a token reservation given back)."""
        stats = self.stats
        if isinstance(reply, ResponseError):  # NOSCRIPT or a script error: nothing was charged
            return
        if isinstance(reply, BaseException):  # the connection went: it may or may not have run
            stats.abandoned_unknown += 1
            return
        try:
            result = self.codec.charge_result(charges, reply)
        except (IndexError, TypeError, ValueError):
            log.error("unreadable reply to an abandoned charge: %.200r", reply)
            stats.abandoned_unknown += 1
            return
        applied = [r for r in result.receipts if r.applied]
        if not applied:
            return
        stats.abandoned_refunds += 1
        refunds = [Adjustment(r, -r.charge.cost) for r in applied]
        if not self.adjust_soon(refunds, self._abandoned_refund_done):
            task = asyncio.get_running_loop().create_task(self._refund_abandoned(refunds))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _abandoned_refund_done(self, error: StoreError | None) -> None:
        if error is not None:
            self.stats.abandoned_refund_failures += 1

    async def _refund_abandoned(self, refunds: Sequence[Adjustment]) -> None:
        try:
            await self._adjust_now(refunds)
        except StoreError:
            self.stats.abandoned_refund_failures += 1

    def _groups(self, keys: Sequence[str]) -> list[list[int]]:
        if not self._cluster:
            return [list(range(len(keys)))]
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(key_slot(self.key(key).encode()), []).append(i)
        return list(by_slot.values())

    async def _charge_group(self, charges: Sequence[Charge]) -> ChargeResult:
        return (await self._charge_group_idle(charges))[0]

    async def _charge_group_idle(self, charges: Sequence[Charge]
                                 ) -> tuple[ChargeResult, tuple[LimitState, ...]]:
        """One EVALSHA for charges in one slot; also returns the states as if not applied."""
        keys, args = self.codec.charge_args(charges)
        return self.codec.group_result(charges, await self._eval(self._charge, keys, args))

    async def _charge_lean_cluster(self, routes: ClusterRoutes, charges: Sequence[Charge]) -> ChargeResult:
        """A Cluster's hot path: each slot's EVALSHA on its primary's lean connection, every one
        written before any reply is awaited (one round-trip time for all slots). A primary not
        connected yet, or cold, takes the awaited path (which connects, or goes through redis-py
        for that primary's slots only); a slot answered with NOSCRIPT or a redirection is sent
        again the awaited way (reload, or redis-py), as the script did not run."""
        groups, subs, calls = self.codec.slot_calls(charges)
        protos = routes.ready(slot for slot, _ in groups)
        if protos is None:
            indices = [g for _, g in groups]
            if len(indices) == 1:
                return await self._guard(lambda: self._charge_group(charges))
            return await self._guard(lambda: self._charge_slots(charges, indices))
        replies = await replies_of(protos, calls, self._deadline,
                                   lambda i, reply: self._undo_abandoned(subs[i], reply))
        try:
            if len(groups) == 1:
                raw = replies[0]
                if isinstance(raw, Exception):
                    if not routes.failed(raw, groups[0][0]):
                        raise raw
                    return await self._charge_group(charges)
                return self.codec.charge_result(charges, raw)
            if all(type(raw) is list and raw[0] == 1 for raw in replies):  # every slot admitted
                return self.codec.merge_admitted(len(charges), groups, subs, replies)
            parts: list[tuple[ChargeResult, tuple[LimitState, ...]] | BaseException] = []
            for (slot, _), sub, raw in zip(groups, subs, replies, strict=True):
                if not isinstance(raw, Exception):
                    parts.append(self.codec.group_result(sub, raw))
                elif routes.failed(raw, slot):
                    try:
                        parts.append(await self._charge_group_idle(sub))
                    except Exception as exc:  # noqa: BLE001 (a failed slot: refund the others)
                        parts.append(exc)
                else:
                    parts.append(raw)
            return await self._combine_slots(charges, [g for _, g in groups], parts)
        except (TimeoutError, RedisError, RedisClusterException, OSError) as exc:
            raise self._store_error(exc) from exc

    async def _charge_slots(self, charges: Sequence[Charge], groups: list[list[int]]) -> ChargeResult:
        """Charge each slot's group concurrently (one round-trip time); if any group denies,
        refund what the admitting groups applied so the request charges nothing."""
        parts = await asyncio.gather(
            *(self._charge_group_idle([charges[i] for i in g]) for g in groups), return_exceptions=True)
        return await self._combine_slots(charges, groups, parts)

    async def _combine_slots(self, charges: Sequence[Charge], groups: list[list[int]],
                             parts: Sequence[tuple[ChargeResult, tuple[LimitState, ...]] | BaseException]
                             ) -> ChargeResult:
        """One result from each slot's (or its failure): if any slot denied or failed, what the
        others applied is refunded and the first failure raised."""
        done = [p for p in parts if isinstance(p, tuple)]
        failed = next((p for p in parts if isinstance(p, BaseException)), None)
        allowed = failed is None and all(p[0].allowed for p in done)
        if not allowed:
            # shielded: a request cancelled meanwhile must not leave the other slots charged
            await asyncio.shield(self._compensate([r for p in done for r in p[0].receipts if r.applied]))
        if failed is not None:
            raise failed
        states: list[LimitState | None] = [None] * len(charges)
        receipts: list[Receipt | None] = [None] * len(charges)
        for group, (part, idle) in zip(groups, done, strict=True):
            shown = part.states if allowed else idle  # refunded: report what is really left
            for i, state, receipt in zip(group, shown, part.receipts, strict=True):
                states[i] = state
                receipts[i] = receipt if allowed else Receipt(receipt.charge, receipt.bucket_ms, False)
        return ChargeResult(allowed, min(p[0].now for p in done),
                            tuple(s for s in states if s is not None),
                            tuple(r for r in receipts if r is not None))

    async def _compensate(self, receipts: Sequence[Receipt]) -> None:
        if not receipts:
            return
        self.stats.compensations += 1
        refunds = [Adjustment(r, -r.charge.cost) for r in receipts]
        try:
            # Own deadline: the charge may have used most of the request's; a failed refund only
            # under-admits until the charged window/TAT/lease expires.
            await self._guard(lambda: self._adjust_all(refunds), self._deadline)
        except StoreError:
            self.stats.compensation_failures += 1

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        todo = [a for a in adjustments if a.receipt.applied and a.delta != 0]
        if todo:
            await self._adjust_now(todo)

    def adjust_soon(self, adjustments: Sequence[Adjustment], done: Done) -> bool:
        """Queue a reconcile without waiting for it (False: not possible, use :meth:`adjust`).
        ``done(error)`` is called once it was applied (``None``) or failed (a ``StoreError``).
        Queued reconciles are written within one event-loop iteration, ahead of every script call
        made after this one on the same connection (charges of the same keys included: in a
        Cluster, a key's primary); :meth:`close` sends them."""
        reconcile = self._reconcile
        if reconcile is None:
            return self._adjust_soon_cluster(adjustments, done)
        for a in adjustments:  # (the stage sends only applied, non-zero ones: no copy then)
            if not a.delta or not a.receipt.applied:
                adjustments = [a for a in adjustments if a.receipt.applied and a.delta != 0]
                break
        if adjustments:
            reconcile.submit(adjustments, done)
        else:
            done(None)
        return True

    def _adjust_soon_cluster(self, adjustments: Sequence[Adjustment], done: Done) -> bool:
        """:meth:`adjust_soon` in a Cluster: each adjustment queued on its primary's connection
        (one settle may reach several primaries: ``done`` is told once, after all of them). An
        adjustment whose primary is cold (or not resolved yet) makes it False."""
        routes = self._routes
        if routes is None:
            return False
        todo = [a for a in adjustments if a.receipt.applied and a.delta != 0]
        queues: dict[ReconcileQueue, list[Adjustment]] = {}
        for a in todo:
            conn = routes.connection(self.codec.wire_of(a.receipt.charge)[4])
            queue = None if conn is None else self._node_queues.get(conn)
            if queue is None:
                return False
            queues.setdefault(queue, []).append(a)
        if not queues:
            done(None)
        elif len(queues) == 1:
            for queue, part in queues.items():
                queue.submit(part, done)
        else:
            outcome = Outcome([done], len(queues))
            for queue, part in queues.items():
                queue.submit(part, outcome.part_done)
        return True

    def _node_queue(self, conn: RespConnection) -> None:
        """A Cluster primary's lean connection was made: give it a reconcile queue."""
        self._node_queues[conn] = ReconcileQueue(conn, self.codec.pack_adjust, self._adjust_now,
                                                 deadline=self._deadline, max_batch=self._settle_batch,
                                                 split=self._split_by_slot)

    def _split_by_slot(self, adjustments: Sequence[Adjustment]) -> list[Sequence[Adjustment]]:
        by_slot: dict[int, list[Adjustment]] = {}
        for a in adjustments:
            by_slot.setdefault(self.codec.wire_of(a.receipt.charge)[4], []).append(a)
        return list(by_slot.values())

    async def _adjust_now(self, adjustments: Sequence[Adjustment]) -> None:
        await self._guard(lambda: self._adjust_all(adjustments))

    async def _adjust_all(self, adjustments: Sequence[Adjustment]) -> None:
        groups = self._groups([a.receipt.charge.key for a in adjustments])
        await asyncio.gather(*(self._adjust_group([adjustments[i] for i in g]) for g in groups))

    async def _adjust_group(self, adjustments: Sequence[Adjustment]) -> None:
        keys, args = self.codec.adjust_args(adjustments)
        await self._eval(self._adjust, keys, args)

    async def renew(self, leases: Sequence[Receipt]) -> tuple[bool, ...]:
        todo = [i for i, r in enumerate(leases) if r.applied and r.charge.algorithm is Algorithm.LEASE]
        renewed = [False] * len(leases)
        if not todo:
            return tuple(renewed)
        # Chunks of one slot each (a Cluster script may only touch one slot), all sent at once.
        groups = [[todo[i] for i in g] for g in self._groups([leases[i].charge.key for i in todo])]
        chunks = [g[at:at + RENEW_BATCH] for g in groups for at in range(0, len(g), RENEW_BATCH)]
        lean = self._lean
        if lean is not None:  # single Redis: EVALSHA on the lean connection, as charges
            replies = await asyncio.gather(*(
                self._lean_eval(lean, self._renew, self._pack_renew([leases[i] for i in chunk]))
                for chunk in chunks))
        else:
            async def call() -> list[Any]:
                return await asyncio.gather(*(
                    self._eval(self._renew, *self._renew_args([leases[i] for i in chunk]))
                    for chunk in chunks))
            replies = await self._guard(call)
        for chunk, reply in zip(chunks, replies, strict=True):
            for i, ok in zip(chunk, reply, strict=True):
                renewed[i] = bool(int(ok))
        return tuple(renewed)

    def _renew_args(self, leases: Sequence[Receipt]) -> tuple[list[str], list[str | int]]:
        args: list[str | int] = []
        for r in leases:
            args += [r.charge.lease_id, r.charge.period_ms]
        return [self.key(r.charge.key) for r in leases], args

    def _pack_renew(self, leases: Sequence[Receipt]) -> bytes:
        keys, args = self._renew_args(leases)
        return pack("EVALSHA", self._renew.sha, len(keys), *keys, *args)

    async def now(self) -> float:
        async def call() -> float:
            sec, usec = await self._client.time()
            return int(sec) + int(usec) / 1e6
        return await self._guard(call)

    async def set_if_absent(self, key: str, ttl: float) -> bool:
        async def call() -> bool:
            ms = max(1, math.ceil(ttl * 1000))
            return bool(await self._client.set(self.key(key), b"1", nx=True, px=ms))
        return await self._guard(call)

    async def ping(self) -> bool:
        try:
            return bool(await self._guard(lambda: self._client.ping()))
        except StoreError:
            return False

    async def close(self) -> None:
        """Send queued reconciles and wait for them (each within the deadline), then close."""
        if self._reconcile is not None:
            await self._reconcile.drain()
        for queue in self._node_queues.values():
            await queue.drain()
        if self._lean is not None:
            await self._lean.close()
        if self._routes is not None:
            await self._routes.close()
        await self._client.aclose()

    @property
    def reconcile(self) -> ReconcileQueue | None:
        """The deferred-reconcile queue (single Redis), for stats and tests."""
        return self._reconcile

    @property
    def routes(self) -> ClusterRoutes | None:
        """The lean routes to a Cluster's primaries (None: single Redis, or lean off)."""
        return self._routes
