"""``SignalStore``: the risk signals' shared state, every read and write of a request in one batch.

The :class:`~gateway.store.base.Store` seam offers one round trip per operation; a request's
risk signals need about ten (several HyperLogLogs, decaying counters, the account's running
state, its friction state). ``SignalStore.batch`` runs a list of small typed operations in one
round trip (one Lua call on Redis) and takes time from the store, so replicas agree.

Operations and their state (all keys expire; nothing a crashed gateway leaves outlives its TTL):

* :class:`HllAdd`: add a member to a HyperLogLog bucketed by ``window`` (current and previous
  bucket counted together: "distinct members over the last one to two windows"). Redis: 12 KiB
  dense / a few hundred bytes sparse per bucket; memory: 8 KiB per bucket.
* :class:`DecayAdd`: add to a tuple of exponentially decaying sums (rates, means). ~50 bytes per
  value.
* :class:`AccountTouch`: one account's running state, updated in place: decayed counters
  (requests, chain-of-thought, single-turn, request shape), last/first seen, an exponentially
  weighted mean and variance of inter-arrival gaps, a 24-bit active-hours bitmap and a
  decayed heavy-hitter template. About 300 bytes per account in Redis (a small hash in listpack
  encoding), about 600 bytes in memory: bounded, whatever the account's volume.
* :class:`StateGet`/:class:`StatePut`/:class:`StateDelete`: small per-account friction state
  (field → JSON with its own expiry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway.risk.hll import HyperLogLog, index_rank
from gateway.risk.memo import Memo

Clock = Callable[[], float]
MAX_GAP = 6 * 3600.0  # gaps longer than this are sessions apart, not request cadence
GAP_ALPHA = 0.2  # weight of the newest gap in the running mean/variance (~5-gap memory)
DAY = 86400.0


@dataclass(frozen=True, slots=True)
class HllAdd:
    key: str
    member: str
    window: float


@dataclass(frozen=True, slots=True)
class DecayAdd:
    key: str
    amounts: tuple[float, ...]
    half_life: float


@dataclass(frozen=True, slots=True)
class AccountTouch:
    """``amounts[0]`` is conventionally the request count; ``template`` may be empty."""

    key: str
    amounts: tuple[float, ...]
    template: str
    half_life: float
    ttl: float


@dataclass(frozen=True, slots=True)
class StateGet:
    key: str


@dataclass(frozen=True, slots=True)
class StatePut:
    key: str
    field: str
    value: str
    ttl: float


@dataclass(frozen=True, slots=True)
class StateDelete:
    key: str
    field: str | None = None  # None: every field


Op = HllAdd | DecayAdd | AccountTouch | StateGet | StatePut | StateDelete


@dataclass(frozen=True, slots=True)
class AccountState:
    """One account's running state after the touch of the current request."""

    previous: float | None  # time of the previous request (None: first seen now)
    first_seen: float
    counts: tuple[float, ...]  # decayed sums, aligned with AccountTouch.amounts
    gap_mean: float
    gap_var: float
    gaps: int  # gaps observed (capped at 1000)
    hours: int  # bit h set: active during UTC hour h within the current day-long stretch
    top_template: str
    top_count: float

    @property
    def gap_cv(self) -> float | None:
        """Coefficient of variation of inter-arrival gaps (None until a gap was seen)."""
        if self.gaps == 0 or self.gap_mean <= 0:
            return None
        return math.sqrt(max(self.gap_var, 0.0)) / self.gap_mean


@dataclass(frozen=True, slots=True)
class BatchResult:
    now: float
    results: tuple[Any, ...]  # per op: int | tuple[float, ...] | AccountState | dict[str, str] | None


@runtime_checkable
class SignalStore(Protocol):
    """Runs a request's signal operations in one round trip; time comes from the store.
    May raise :class:`gateway.store.base.StoreError` when the backend is unavailable."""

    async def batch(self, ops: Sequence[Op]) -> BatchResult: ...

    async def close(self) -> None: ...


def decay(value: float, elapsed: float, half_life: float) -> float:
    if elapsed <= 0 or value == 0.0:
        return value
    return value * math.pow(2.0, -elapsed / half_life)


@dataclass(slots=True)
class _Entry:
    expires: float
    value: Any


@dataclass(slots=True)
class _Account:
    last: float
    first: float
    counts: list[float]
    gap_mean: float = 0.0
    gap_var: float = 0.0
    gaps: int = 0
    hours: int = 0
    hours_start: float = 0.0
    top: str = ""
    top_count: float = 0.0


def touch_account(acc: _Account | None, op: AccountTouch, now: float) -> tuple[_Account, AccountState]:
    """The account update rule (mirrored by the Redis Lua script, keep them in step)."""
    if acc is None:
        acc = _Account(last=now, first=now, counts=[0.0] * len(op.amounts), hours_start=now)
        previous = None
    else:
        previous = acc.last
        elapsed = now - acc.last
        if elapsed > 0:  # decay(), with the factor computed once for every counter
            factor = math.pow(2.0, -elapsed / op.half_life)
            acc.counts = [c * factor for c in acc.counts]
            acc.top_count *= factor
        if len(acc.counts) < len(op.amounts):
            acc.counts += [0.0] * (len(op.amounts) - len(acc.counts))
        if 0 < elapsed <= MAX_GAP:
            if acc.gaps == 0:
                acc.gap_mean, acc.gap_var = elapsed, 0.0
            else:
                diff = elapsed - acc.gap_mean
                acc.gap_mean += GAP_ALPHA * diff
                acc.gap_var = (1 - GAP_ALPHA) * (acc.gap_var + GAP_ALPHA * diff * diff)
            acc.gaps = min(acc.gaps + 1, 1000)
        acc.last = now
    counts = acc.counts
    for i, amount in enumerate(op.amounts):
        counts[i] += amount
    if now - acc.hours_start > DAY:
        acc.hours, acc.hours_start = 0, now
    acc.hours |= 1 << int(now // 3600 % 24)
    if op.template:
        if acc.top == op.template:
            acc.top_count += 1.0
        elif acc.top_count <= 1.0:
            acc.top, acc.top_count = op.template, 1.0
        else:
            acc.top_count -= 1.0
    state = AccountState(previous, acc.first, tuple(acc.counts), acc.gap_mean, acc.gap_var, acc.gaps,
                         acc.hours, acc.top, acc.top_count)
    return acc, state


@dataclass(slots=True)
class MemorySignalStore:
    """Single-process :class:`SignalStore` with an injected clock (tests, one worker)."""

    clock: Clock = time.time
    sweep_every: int = 10_000
    _data: dict[str, _Entry] = field(default_factory=dict)
    _ops: int = 0
    # Register hashes of HLL members (accounts/orgs: a request adds the same one to several keys).
    _hashes: Memo[tuple[int, int]] = field(default_factory=lambda: Memo(16384, 256))

    def _hash(self, member: str) -> tuple[int, int]:
        return self._hashes(member, index_rank)

    def _get(self, key: str, now: float) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._data[key]
            return None
        return entry.value

    def _sweep(self, now: float) -> None:
        # Amortised: one pass every ``sweep_every`` operations keeps memory bounded by TTLs.
        for key in [k for k, e in self._data.items() if e.expires <= now]:
            del self._data[key]

    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        now = self.clock()
        self._ops += len(ops)
        if self._ops >= self.sweep_every:
            self._ops = 0
            self._sweep(now)
        one = self._one
        return BatchResult(now, tuple([one(op, now) for op in ops]))

    def _one(self, op: Op, now: float) -> Any:
        kind = type(op)
        if kind is HllAdd:
            return self._hll_add(op, now)  # type: ignore[arg-type]
        if kind is DecayAdd:
            return self._decay_add(op, now)  # type: ignore[arg-type]
        if isinstance(op, AccountTouch):
            entry = self._data.get(op.key)
            acc = entry.value if entry is not None and entry.expires > now else None
            acc, state = touch_account(acc, op, now)
            if entry is not None and entry.value is acc:
                entry.expires = now + op.ttl
            else:
                self._data[op.key] = _Entry(now + op.ttl, acc)
            return state
        if isinstance(op, StateGet):
            fields: dict[str, tuple[float, str]] = self._get(op.key, now) or {}
            return {f: v for f, (exp, v) in fields.items() if exp > now} if fields else {}
        if isinstance(op, StatePut):
            fields = self._get(op.key, now) or {}
            fields[op.field] = (now + op.ttl, op.value)
            expires = max(exp for exp, _v in fields.values())
            self._data[op.key] = _Entry(expires, fields)
            return None
        if isinstance(op, StateDelete):
            fields = self._get(op.key, now) or {}
            if op.field is None:
                self._data.pop(op.key, None)
            else:
                fields.pop(op.field, None)
        return None

    def _hll_add(self, op: HllAdd, now: float) -> int:
        # One entry per key holds its current bucket; the previous bucket is only ever read when
        # the next one starts (its members are copied into the new bucket's view), so it need not
        # be kept under a key of its own.
        bucket = int(now // op.window)
        entry = self._data.get(op.key)
        if entry is None or entry.expires <= now or entry.value[0] != bucket:
            previous = entry.value[1] if (entry is not None and entry.expires > now
                                          and entry.value[0] == bucket - 1) else None
            entry = _Entry(now + 2 * op.window + 1, (bucket, HyperLogLog(previous)))
            self._data[op.key] = entry
        hll: HyperLogLog = entry.value[1]
        hll.add(op.member, self._hash)
        return hll.count()

    def _decay_add(self, op: DecayAdd, now: float) -> tuple[float, ...]:
        entry = self._data.get(op.key)
        if entry is None or entry.expires <= now:
            out = op.amounts
            self._data[op.key] = _Entry(now + 8 * op.half_life, (now, out))
            return out
        last, values = entry.value
        elapsed = now - last
        if elapsed > 0:
            factor = math.pow(2.0, -elapsed / op.half_life)
            out = tuple([v * factor + a for v, a in zip(values, op.amounts, strict=False)])
        else:
            out = tuple([v + a for v, a in zip(values, op.amounts, strict=False)])
        entry.expires = now + 8 * op.half_life
        entry.value = (now, out)
        return out

    async def close(self) -> None:
        self._data.clear()
