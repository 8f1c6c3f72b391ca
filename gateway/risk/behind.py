"""``BehindSignalStore``: risk signals answered from a local mirror, written to the store behind.

With Redis, an awaited batch puts the script (~140 µs of server time on a 2-core machine) and a
round trip on every request's critical path, and one ``EVALSHA`` per request. In ``behind`` mode a
request whose account is already mirrored is answered at once from a local mirror of the values
the store last returned, with this request applied to them locally (the same update rules as the
memory store); its operations are queued and every batch queued during one event-loop iteration
goes to the store as one call. The store's answer then replaces the mirrored values, so what a
request reads includes every replica's writes up to the previous store answer for each key.

What that costs in exactness, and why it is bounded:

* A request sees shared counts (distinct accounts per template, address, prefix, ASN; template and
  cluster evidence) as of the latest store answer for that key on this replica: a lag of the
  requests other replicas made during one round trip, or of one request when a key is new to the
  mirror (a key never seen locally is answered as new: one account, this request's amounts).
* An account not in the mirror (its first request here, or after eviction) and a friction-state
  read are answered by an awaited batch (``inline``), so account age, volume and sticky friction
  are never guessed from nothing. Friction state written through this store (``StatePut``,
  ``StateDelete``) drops the account's mirrored state: its next request reads the store.
  A friction state set or cleared by another replica is seen from this replica's next store
  answer for that account (one request later).
* The store sets the pace: past ``max_backlog`` unanswered operations, requests are answered
  by awaited batches again until it catches up, so neither the queue nor the mirror's lead on
  the store grows without bound when the store is slower than the traffic.
* Writes are never lost silently: a failed flush is counted (``flush_errors``) and every account
  in it leaves the mirror, so the account's next request goes inline and meets the error there
  (scored from local signals, as for any store failure).

The mirror is bounded (``max_entries``): first in, first out, except that an account moves to the
young end whenever one of its requests is answered locally; nothing in it outlives the process.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from gateway.memo import make_room
from gateway.risk.sigstore import (
    AccountState,
    AccountTouch,
    BatchResult,
    DecayAdd,
    HllAdd,
    Op,
    SignalStore,
    StateDelete,
    StateGet,
    StatePut,
    _Account,
    decayed_sums,
    touch_account,
)
from gateway.store.base import StoreError

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class _Mirrored:
    """One key's latest known value and how many of its operations the store has not answered."""

    __slots__ = ("value", "pending")

    def __init__(self, value: Any) -> None:
        self.value = value
        self.pending = 0


def account_from_state(state: AccountState, now: float) -> _Account:
    """The running record behind ``state`` (the state right after a touch at ``now``)."""
    return _Account(last=now, first=state.first_seen, counts=list(state.counts), gap_mean=state.gap_mean,
                    gap_var=state.gap_var, gaps=state.gaps, hours=state.hours, hours_start=state.hours_start,
                    top=state.top_template, top_count=state.top_count)


class BehindSignalStore:
    """:class:`SignalStore` that answers mirrored accounts locally and writes to ``inner`` behind.

    ``coalesce`` sends every batch queued in one loop iteration as one call (Redis: one
    ``EVALSHA``, split every ``max_ops`` operations); without it each request's batch is sent on
    its own, in the request's context (the simulator's virtual clock is a context variable).
    """

    def __init__(self, inner: SignalStore, *, clock: Clock = time.time, max_entries: int = 200_000,
                 max_ops: int = 256, max_backlog: int = 4096, coalesce: bool = True) -> None:
        if max_entries <= 0 or max_ops <= 0 or max_backlog <= 0:
            raise ValueError("max_entries, max_ops and max_backlog must be positive")
        self._max_backlog = max_backlog
        self._backlog = 0  # operations queued or sent and not yet answered
        self._inner = inner
        self._clock = clock
        self._max_entries = max_entries
        self._max_ops = max_ops
        self._coalesce = coalesce
        self._mirror: dict[str, _Mirrored] = {}
        self._offset = 0.0  # store time minus local time, from the latest store answer
        self._queue: list[Op] = []
        self._flush_scheduled = False
        self._inflight: set[asyncio.Task[Any]] = set()
        self._unanswered = 0  # sends made through the inner store's send_soon, not yet answered
        self._answered: asyncio.Event | None = None  # set when _unanswered drops to 0 (drain)
        # A store that can send without a task (RedisSignalStore on its lean connection)
        self._send_soon: Callable[[Sequence[Op], Callable[[BatchResult | StoreError], None]], bool] | None = (
            getattr(inner, "send_soon", None))
        self.local_batches = 0  # answered from the mirror
        self.inline_batches = 0  # awaited
        self.flushes = 0  # store calls made for queued operations
        self.flush_errors = 0

    @property
    def inner(self) -> SignalStore:
        return self._inner

    def __len__(self) -> int:
        return len(self._mirror)

    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        # Past the backlog bound the store is not keeping up: await it (backpressure), which
        # also bounds how far the mirror can run ahead of the store.
        if self._backlog < self._max_backlog:
            held = self._held(ops)
            if held is not None:
                return self._local(ops, held)
        self.inline_batches += 1
        result = await self._inner.batch(ops)
        self._learn(ops, result, answered_pending=False)
        for op in ops:  # friction state changed here: the account's next read goes to the store
            if type(op) is StatePut or type(op) is StateDelete:
                self._mirror.pop(op.key, None)
        return result

    def _held(self, ops: Sequence[Op]) -> dict[str, _Mirrored] | None:
        """The mirrored entries of a request's account and friction state, or None when the batch
        must go to the store (account or state not mirrored; writes of friction state; a batch
        without an account). Held for the answer: the keys the request adds may evict them from
        the mirror meanwhile. A held account moves to the young end of the mirror (first in,
        first out otherwise), so an active account is not evicted for being old."""
        mirror = self._mirror
        held: dict[str, _Mirrored] | None = None
        touched = False
        for op in ops:
            kind = type(op)
            if kind is AccountTouch or kind is StateGet:
                entry = mirror.pop(op.key, None)
                if entry is None:
                    return None
                mirror[op.key] = entry  # re-inserted: now the youngest
                if held is None:
                    held = {}
                held[op.key] = entry
                touched = touched or kind is AccountTouch
            elif kind is not HllAdd and kind is not DecayAdd:
                return None
        return held if touched else None

    def _local(self, ops: Sequence[Op], held: dict[str, _Mirrored]) -> BatchResult:
        self.local_batches += 1
        now = self._clock() + self._offset
        mirror = self._mirror
        results: list[Any] = []
        append = results.append
        for op in ops:
            kind = type(op)
            entry = mirror.get(op.key)
            if kind is HllAdd:
                if entry is None:
                    entry = self._insert(op.key, 1)
                append(entry.value)
            elif kind is DecayAdd:
                values = (decayed_sums(entry.value, op, now) if entry is not None  # type: ignore[arg-type]
                          else op.amounts)  # type: ignore[union-attr]
                if entry is None:
                    entry = self._insert(op.key, (now, values))
                else:
                    entry.value = (now, values)
                append(values)
            elif kind is AccountTouch:
                entry = held[op.key]
                acc, state = touch_account(entry.value, op, now)  # type: ignore[arg-type]
                entry.value = acc
                append(state)
            else:  # StateGet
                entry = held[op.key]
                append(entry.value)
            entry.pending += 1
        self._enqueue(ops)
        return BatchResult(now, tuple(results))

    def _insert(self, key: str, value: Any) -> _Mirrored:
        mirror = self._mirror
        make_room(mirror, self._max_entries)
        entry = mirror[key] = _Mirrored(value)
        return entry

    def _enqueue(self, ops: Sequence[Op]) -> None:
        self._backlog += len(ops)
        if not self._coalesce:
            self._spawn(list(ops), contextvars.copy_context())
            return
        self._queue.extend(ops)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        step = self._max_ops
        for start in range(0, len(queue), step):
            self._spawn(queue[start:start + step], None)

    def _spawn(self, ops: list[Op], context: contextvars.Context | None) -> None:
        self.flushes += 1
        send_soon = self._send_soon
        if context is None and send_soon is not None and send_soon(ops, partial(self._sent, ops)):
            self._unanswered += 1
            return
        task = asyncio.get_running_loop().create_task(self._send(ops), context=context)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send(self, ops: list[Op]) -> None:
        try:
            result = await self._inner.batch(ops)
        except StoreError as exc:
            self._failed(ops, exc)
            return
        except Exception as exc:  # noqa: BLE001 - not a store outage, but the writes are lost all the same
            log.exception("risk signal store: queued signal writes raised")
            self._failed(ops, StoreError(repr(exc)))
            return
        finally:
            self._backlog -= len(ops)
        self._learn(ops, result, answered_pending=True)

    def _sent(self, ops: list[Op], outcome: BatchResult | StoreError) -> None:
        self._unanswered -= 1
        self._backlog -= len(ops)
        if isinstance(outcome, StoreError):
            self._failed(ops, outcome)
        else:
            self._learn(ops, outcome, answered_pending=True)
        if self._unanswered == 0 and self._answered is not None:
            self._answered.set()

    def _failed(self, ops: list[Op], exc: StoreError) -> None:
        self.flush_errors += 1
        log.warning("risk signal store: queued signal writes failed: %s", exc)
        self._forget(ops)

    def _learn(self, ops: Sequence[Op], result: BatchResult, *, answered_pending: bool) -> None:
        """Store answers replace mirrored values, unless a later local update is still unanswered
        (its own answer, which includes this one, will replace it)."""
        now = result.now
        self._offset = now - self._clock()
        mirror = self._mirror
        for op, value in zip(ops, result.results, strict=True):
            kind = type(op)
            if kind is StatePut or kind is StateDelete:
                continue
            entry = mirror.get(op.key)
            if entry is not None and answered_pending and entry.pending > 0:
                entry.pending -= 1
            if entry is not None and entry.pending > 0:
                continue
            if kind is HllAdd:
                fresh: Any = value
            elif kind is DecayAdd:
                fresh = (now, value)
            elif kind is AccountTouch:
                fresh = account_from_state(value, now)
            else:
                fresh = value
            if entry is None:
                self._insert(op.key, fresh)
            else:
                entry.value = fresh

    def _forget(self, ops: Sequence[Op]) -> None:
        mirror = self._mirror
        for op in ops:
            entry = mirror.get(op.key)
            if entry is None:
                continue
            entry.pending = max(0, entry.pending - 1)
            if type(op) is AccountTouch or type(op) is StateGet:
                del mirror[op.key]  # the account's next request goes inline

    async def drain(self) -> None:
        """Send what is queued and wait for every queued write to be answered (or fail)."""
        if self._queue:
            self._flush()
        while self._inflight or self._unanswered:
            if self._inflight:
                await asyncio.wait(list(self._inflight))
            if self._unanswered:
                self._answered = asyncio.Event()
                await self._answered.wait()
                self._answered = None

    async def close(self) -> None:
        await self.drain()
        self._mirror.clear()
        await self._inner.close()

    def status(self) -> dict[str, int]:
        return {"mirrored": len(self._mirror), "backlog": self._backlog, "local_batches": self.local_batches,
                "inline_batches": self.inline_batches, "flushes": self.flushes,
                "flush_errors": self.flush_errors}

