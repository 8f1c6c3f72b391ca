"""Deferred reconciles: settles queued and sent together, one EVALSHA per batch.

Every request with a token or spend limit reconciles its reservation when it ends. Awaiting a
round trip per settle doubles the store traffic of the hot path, so ``RedisStore.adjust_soon``
queues the adjustments here and returns at once. The queue rides on the lean connection's next
write (:class:`~gateway.store.resp.Prelude`): everything queued since the last write goes out as
one EVALSHA of ``adjust.lua`` (split every ``max_batch`` adjustments), *ahead* of every other
command in that write. Hence:

* a reconcile is written at most one event-loop iteration after its settle returned, and applied
  one round trip later (the same latency an awaited reconcile had, minus the wait);
* any command this process sends after a settle returned (the next charge especially) is executed
  by Redis after that reconcile: Redis runs one connection's commands in order;
* ``drain`` (``RedisStore.close``) sends what is queued and waits for every batch.

A batch reconciles each limit key and bucket once (:func:`merge`): the requests of one org, or
one account, reconcile the same token budget, and on a busy key a batch holds several of them.

Each batch has the store deadline. Its outcome goes to every settle in it through the ``done``
callback given to :meth:`ReconcileQueue.submit` (``None``, or the ``StoreError``), where the
breaker and ``settle_failures`` count it one settle at a time, as for an awaited reconcile. A
batch refused with NOSCRIPT, or queued while the connection is down, takes the awaited path
(script reload, reconnect) in a task of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from redis.exceptions import NoScriptError

from gateway.store.base import Adjustment, Algorithm, StoreError
from gateway.store.resp import RespConnection

# What a settle is told when its batch is done: None (applied) or the StoreError.
Done = Callable[[StoreError | None], None]


class ReconcileQueue:
    """Adjustments queued by settles, written ahead of the connection's next write."""

    def __init__(self, conn: RespConnection, pack: Callable[[Sequence[Adjustment]], bytes],
                 resend: Callable[[Sequence[Adjustment]], Awaitable[None]], *, deadline: float,
                 max_batch: int = 128,
                 split: Callable[[Sequence[Adjustment]], list[Sequence[Adjustment]]] | None = None) -> None:
        self._conn = conn
        self._pack = pack  # a batch as one packed EVALSHA
        self._resend = resend  # the awaited path (connects, reloads scripts); raises StoreError
        # A Cluster primary's queue: a script may touch one slot only, so a batch goes out as one
        # EVALSHA per slot (its settles are told once all of them are answered).
        self._split = split
        self._deadline = deadline
        self._max_batch = max(1, max_batch)
        self._queue: list[tuple[Sequence[Adjustment], Done]] = []  # one entry per settle
        self._pending = 0
        self._inflight: set[asyncio.Future[Any]] = set()
        self.batches = 0  # batches sent (stats: adjustments / batches = mean batch size)
        self.adjustments = 0
        conn.prelude = self

    @property
    def pending(self) -> int:
        """Adjustments queued and not yet written."""
        return self._pending

    def submit(self, adjustments: Sequence[Adjustment], done: Done) -> None:
        """Queue one settle's adjustments; ``done`` is called once with the outcome."""
        proto = self._conn.proto
        if proto is None or proto.closed:  # not connected (first use, or Redis went away): connect, then send
            self._spawn(list(adjustments), Outcome([done], 1))
            return
        self._queue.append((adjustments, done))
        self._pending += len(adjustments)
        proto.schedule_write()

    def take(self) -> list[tuple[bytes, asyncio.Future[Any]]]:
        """The queue as packed EVALSHAs with their reply futures (the connection writes them).
        A batch closes once it holds ``max_batch`` adjustments; a settle is never split."""
        if not self._queue:
            return []
        queue, self._queue, self._pending = self._queue, [], 0
        proto = self._conn.proto  # the connection taking the queue
        loop = proto.loop if proto is not None else asyncio.get_running_loop()
        out: list[tuple[bytes, asyncio.Future[Any]]] = []
        batch: list[Adjustment] = []
        waiters: list[Done] = []
        for i, (adjustments, done) in enumerate(queue):
            batch.extend(adjustments)
            waiters.append(done)
            if len(batch) < self._max_batch and i + 1 < len(queue):
                continue
            self.adjustments += len(batch)
            merged = merge(batch)
            if not merged:  # they cancel out: nothing to send
                _notify(waiters, None)
                batch, waiters = [], []
                continue
            pieces = [merged] if self._split is None else self._split(merged)
            outcome = Outcome(waiters, len(pieces))
            for piece in pieces:
                fut: asyncio.Future[Any] = loop.create_future()  # the connection applies the deadline
                fut.add_done_callback(partial(self._answered, piece, outcome))
                self._inflight.add(fut)
                self.batches += 1
                out.append((self._pack(piece), fut))
            batch, waiters = [], []
        return out

    def lost(self) -> None:
        """The connection died before the queue was written: send it the awaited way."""
        queue, self._queue, self._pending = self._queue, [], 0
        for adjustments, done in queue:
            self._spawn(list(adjustments), Outcome([done], 1))

    def _answered(self, batch: Sequence[Adjustment], outcome: Outcome, fut: asyncio.Future[Any]) -> None:
        self._inflight.discard(fut)
        if fut.cancelled():  # only by close()
            error: StoreError | None = StoreError("store closed")
        else:
            exc = fut.exception()
            if isinstance(exc, NoScriptError):  # flushed scripts: the awaited path reloads them
                self._spawn(batch, outcome)
                return
            if exc is None:
                error = None
            elif isinstance(exc, TimeoutError):
                error = StoreError(f"store deadline of {self._deadline * 1000:.0f} ms exceeded")
            else:
                error = StoreError(f"store error: {exc}")
        outcome.part_done(error)

    def _spawn(self, batch: Sequence[Adjustment], outcome: Outcome) -> None:
        task = asyncio.ensure_future(self._send_awaited(batch, outcome))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send_awaited(self, batch: Sequence[Adjustment], outcome: Outcome) -> None:
        try:
            await self._resend(batch)
        except StoreError as exc:
            outcome.part_done(exc)
        else:
            outcome.part_done(None)

    async def drain(self) -> None:
        """Send what is queued and wait until every batch is answered or has failed."""
        if self._queue:
            proto = self._conn.ready
            if proto is not None:
                proto.schedule_write()
            else:
                self.lost()
        while self._queue or self._inflight:
            if self._inflight:
                await asyncio.wait(list(self._inflight))
            else:
                await asyncio.sleep(0)  # the write scheduled above takes the queue


def merge(adjustments: Sequence[Adjustment]) -> Sequence[Adjustment]:
    """One adjustment per limit key and bucket (or TAT), with the deltas summed, in the order
    each first appeared; those that sum to zero are left out. Each reconcile costs Redis a few
    commands, so a busy key's reconciles in one batch cost one reconcile. Lease releases are
    never merged (each names its own lease). Summing first differs from applying one at a time
    only where a refund would take a bucket below zero in between (it stops at zero), which a
    refund of a request's own reservation cannot do while its bucket holds it."""
    if len(adjustments) < 2:
        return adjustments
    at: dict[tuple[str, Algorithm, int, int, int], int] = {}  # merge key -> index in out
    out: list[Adjustment] = []
    for adjustment in adjustments:
        receipt = adjustment.receipt
        charge = receipt.charge
        if charge.algorithm is Algorithm.LEASE:
            out.append(adjustment)
            continue
        # The numbers too: a reload may change a limit's numbers under the same key.
        key = (charge.key, charge.algorithm, charge.limit, charge.period_ms, receipt.bucket_ms)
        index = at.get(key)
        if index is None:
            at[key] = len(out)
            out.append(adjustment)
        else:
            first = out[index]
            out[index] = Adjustment(first.receipt, first.delta + adjustment.delta)
    if len(out) == len(adjustments):
        return adjustments
    return [adjustment for adjustment in out if adjustment.delta]


def _notify(waiters: list[Done], error: StoreError | None) -> None:
    for done in waiters:
        done(error)


class Outcome:
    """The settles of one batch, told once every part of it (one per slot in a Cluster) is
    answered: the first failure, or None."""

    __slots__ = ("error", "left", "waiters")

    def __init__(self, waiters: list[Done], parts: int) -> None:
        self.waiters = waiters
        self.left = parts
        self.error: StoreError | None = None

    def part_done(self, error: StoreError | None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self.left -= 1
        if self.left == 0:
            _notify(self.waiters, self.error)
