"""``RedisSignalStore``: every signal operation of a request in one ``EVALSHA`` (one round trip).

Time is Redis ``TIME``, so replicas with skewed clocks agree. Keys are hash-tagged
(``prefix{base}``) so the current and previous HyperLogLog buckets of one key share a slot.

Redis Cluster: one script call must touch a single slot, and a request's keys (account, ip,
prefix, ASN, template) live in different slots. This implementation targets a single Redis
(or one shard dedicated to risk state); for a Cluster, group the operations by slot and send one
call per slot in a pipeline (not implemented yet; see docs/distillation.md).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from hiredis import pack_command
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

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


def _encode(op: Op, args: list[str | float]) -> None:
    if isinstance(op, HllAdd):
        args += ["h", op.member, op.window]
    elif isinstance(op, DecayAdd):
        args += ["d", op.half_life, len(op.amounts), *op.amounts]
    elif isinstance(op, AccountTouch):
        args += ["a", op.ttl, op.half_life, op.template, len(op.amounts), *op.amounts]
    elif isinstance(op, StateGet):
        args.append("g")
    elif isinstance(op, StatePut):
        args += ["p", op.field, op.value, op.ttl]
    else:
        args += ["x", op.field or ""]



def _decode(ops: Sequence[Op], raw: list[Any]) -> BatchResult:
    values = [v.decode() if type(v) is bytes else str(v) for v in raw]
    now = float(values[0])
    pos = 1
    results: list[Any] = []
    for op in ops:
        if isinstance(op, HllAdd):
            results.append(int(values[pos]))
            pos += 1
        elif isinstance(op, DecayAdd):
            n = len(op.amounts)
            results.append(tuple(float(v) for v in values[pos:pos + n]))
            pos += n
        elif isinstance(op, AccountTouch):
            n = len(op.amounts)
            prev, first, gm, gv, gk, hours, tp, tc = values[pos:pos + 8]
            counts = tuple(float(v) for v in values[pos + 8:pos + 8 + n])
            pos += 8 + n
            results.append(AccountState(float(prev) if prev else None, float(first), counts, float(gm),
                                        float(gv), int(float(gk)), int(float(hours)), tp, float(tc)))
        elif isinstance(op, StateGet):
            count = int(values[pos])
            pairs = values[pos + 1:pos + 1 + 2 * count]
            results.append(dict(zip(pairs[::2], pairs[1::2], strict=True)))
            pos += 1 + 2 * count
        else:
            results.append(None)
    return BatchResult(now, tuple(results))


class RedisSignalStore:
    """:class:`~gateway.risk.sigstore.SignalStore` over a ``redis.asyncio`` client.

    Hot path (a plain single-Redis client): the script goes out on a pooled connection directly,
    packed by hiredis, skipping redis-py's per-command retry wrapper and instrumentation (most of
    its client CPU per call), as :class:`gateway.store.redis.RedisStore` does."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "tg:risk:", deadline: float = 0.05,
                 owns_client: bool = False) -> None:
        self._client = client
        self._prefix = prefix
        self._deadline = deadline
        self._owns = owns_client
        self._script = resources.files("gateway.risk").joinpath("signals.lua").read_text(encoding="utf-8")
        self._sha = hashlib.sha1(self._script.encode()).hexdigest()
        self._pool: ConnectionPool | None = (
            client.connection_pool if client.connection is None and not client.single_connection_client
            else None)
        self.script_reloads = 0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisSignalStore:
        # No client-side retries: a re-sent batch would count a request twice.
        client = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
        return cls(client, owns_client=True, **kwargs)

    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        prefix = self._prefix
        keys = [f"{prefix}{{{op.key}}}" for op in ops]
        args: list[str | float] = []
        for op in ops:
            _encode(op, args)
        try:
            async with asyncio.timeout(self._deadline):
                raw = await self._eval(keys, args)
        except (RedisError, TimeoutError, OSError) as exc:
            raise StoreError(f"risk signal store: {exc!r}") from exc
        return _decode(ops, raw)

    async def _eval(self, keys: list[str], args: list[str | float]) -> Any:
        try:
            return await self._evalsha(keys, args)
        except NoScriptError:  # a restart, SCRIPT FLUSH or a failover to a replica without it
            self.script_reloads += 1
            await self._client.script_load(self._script)
            return await self._evalsha(keys, args)

    async def _evalsha(self, keys: list[str], args: list[str | float]) -> Any:
        pool = self._pool
        if pool is None:
            return await self._client.evalsha(self._sha, len(keys), *keys, *args)
        # What Redis.execute_command does for EVALSHA (no response callback), minus the retry
        # wrapper and the metrics hooks: send_packed_command/read_response disconnect the
        # connection on any error or cancellation, release() returns it to the pool.
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            command: tuple[Any, ...] = ("EVALSHA", self._sha, len(keys), *keys, *args)
            await conn.send_packed_command(pack_command(command))
            return await conn.read_response()
        finally:
            await pool.release(conn)

    async def close(self) -> None:
        if self._owns:
            await self._client.aclose()
