"""``SignalStore``: the risk signals' shared state, every read and write of a request in one batch.

The :class:`~gateway.store.base.Store` seam offers one round trip per operation; a request's
risk signals need about ten (several HyperLogLogs, decaying counters, the account's running
state, its friction state). ``SignalStore.batch`` runs a list of small typed operations in one
round trip (one Lua call on Redis) and takes time from the store, so replicas agree.

Operations and their state (all keys expire; nothing a crashed gateway leaves outlives its TTL):

* :class:`HllAdd`: add a member to a HyperLogLog bucketed by ``window`` (current and previous
  bucket counted together: "distinct members over the last one to two windows"). Redis: 12 KiB
  dense / a few hundred bytes sparse per bucket, plus the window's union view (bucket ∪ previous
  bucket, at most as much again); memory: 8 KiB per bucket.
* :class:`DecayAdd`: add to a tuple of exponentially decaying sums (rates, means). ~50 bytes per
  value.
* :class:`AccountTouch`: one account's running state, updated in place: decayed counters
  (requests, chain-of-thought, single-turn, request shape), last/first seen, an exponentially
  weighted mean and variance of inter-arrival gaps, a 24-bit active-hours bitmap and a
  decayed heavy-hitter template. About 150 bytes per account in Redis (one string of packed
  doubles, see ``signals.lua``), about 600 bytes in memory: bounded, whatever the account's volume.
* :class:`StateGet`/:class:`StatePut`/:class:`StateDelete`: small per-account friction state
  (field → JSON with its own expiry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from gateway.memo import Memo
from gateway.risk.hll import HyperLogLog, index_rank

Clock = Callable[[], float]
MAX_GAP = 6 * 3600.0  # gaps longer than this are sessions apart, not request cadence
GAP_ALPHA = 0.2  # weight of the newest gap in the running mean/variance (~5-gap memory)
DAY = 86400.0


# Operations and results are named tuples: immutable like frozen dataclasses, but built in a
# third of the time (a request makes about ten of them; see docs/distillation.md).


class HllAdd(NamedTuple):
    key: str
    member: str
    window: float


class DecayAdd(NamedTuple):
    key: str
    amounts: tuple[float, ...]
    half_life: float


class AccountTouch(NamedTuple):
    """``amounts[0]`` is conventionally the request count; ``template`` may be empty."""

    key: str
    amounts: tuple[float, ...]
    template: str
    half_life: float
    ttl: float


class StateGet(NamedTuple):
    key: str


class StatePut(NamedTuple):
    key: str
    field: str
    value: str
    ttl: float


class StateDelete(NamedTuple):
    key: str
    field: str | None = None  # None: every field


Op = HllAdd | DecayAdd | AccountTouch | StateGet | StatePut | StateDelete


class AccountState(NamedTuple):
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
    hours_start: float = 0.0  # when the ``hours`` bitmap's day-long stretch began

    @property
    def gap_cv(self) -> float | None:
        """Coefficient of variation of inter-arrival gaps (None until a gap was seen)."""
        if self.gaps == 0 or self.gap_mean <= 0:
            return None
        return math.sqrt(max(self.gap_var, 0.0)) / self.gap_mean


class BatchResult(NamedTuple):
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


def decayed_sums(previous: tuple[float, tuple[float, ...]], op: DecayAdd, now: float) -> tuple[float, ...]:
    """The decaying-sum rule (mirrored by signals.lua): ``previous`` is ``(time, sums)``, decayed
    to ``now`` and ``op.amounts`` added."""
    last, values = previous
    amounts = op.amounts
    elapsed = now - last
    if len(values) == 2 and len(amounts) == 2:  # (count, sum): every caller in the risk stage
        if elapsed > 0:
            factor = math.pow(2.0, -elapsed / op.half_life)
            return (values[0] * factor + amounts[0], values[1] * factor + amounts[1])
        return (values[0] + amounts[0], values[1] + amounts[1])
    if elapsed > 0:
        factor = math.pow(2.0, -elapsed / op.half_life)
        return tuple([v * factor + a for v, a in zip(values, amounts, strict=False)])
    return tuple([v + a for v, a in zip(values, amounts, strict=False)])


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
    amounts = op.amounts
    if acc is None:
        acc = _Account(last=now, first=now, counts=[0.0 + a for a in amounts], hours_start=now)
        previous = None
    else:
        previous = acc.last
        elapsed = now - previous
        counts = acc.counts
        if len(counts) < len(amounts):
            counts += [0.0] * (len(amounts) - len(counts))
        if elapsed > 0:  # decay(), with the factor computed once for every counter
            factor = math.pow(2.0, -elapsed / op.half_life)
            if len(counts) == len(amounts):
                acc.counts = [c * factor + a for c, a in zip(counts, amounts, strict=True)]
            else:
                acc.counts = [c * factor for c in counts]
                for i, amount in enumerate(amounts):
                    acc.counts[i] += amount
            acc.top_count *= factor
            if elapsed <= MAX_GAP:
                if acc.gaps == 0:
                    acc.gap_mean, acc.gap_var = elapsed, 0.0
                else:
                    diff = elapsed - acc.gap_mean
                    acc.gap_mean += GAP_ALPHA * diff
                    acc.gap_var = (1 - GAP_ALPHA) * (acc.gap_var + GAP_ALPHA * diff * diff)
                acc.gaps = min(acc.gaps + 1, 1000)
        else:
            for i, amount in enumerate(amounts):
                counts[i] += amount
        acc.last = now
    if now - acc.hours_start > DAY:
        acc.hours, acc.hours_start = 0, now
    acc.hours |= 1 << int(now // 3600 % 24)
    template = op.template
    if template:
        if acc.top == template:
            acc.top_count += 1.0
        elif acc.top_count <= 1.0:
            acc.top, acc.top_count = template, 1.0
        else:
            acc.top_count -= 1.0
    state = AccountState(previous, acc.first, tuple(acc.counts), acc.gap_mean, acc.gap_var, acc.gaps,
                         acc.hours, acc.top, acc.top_count, acc.hours_start)
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
        results: list[Any] = []
        append = results.append
        for op in ops:  # the two common kinds first, by exact type (cheaper than isinstance)
            kind = type(op)
            if kind is HllAdd:
                append(self._hll_add(op, now))  # type: ignore[arg-type]
            elif kind is DecayAdd:
                append(self._decay_add(op, now))  # type: ignore[arg-type]
            else:
                append(self._other(op, now))
        return BatchResult(now, tuple(results))

    def _other(self, op: Op, now: float) -> Any:
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
        if isinstance(op, HllAdd):  # a subclass: not dispatched by exact type above
            return self._hll_add(op, now)
        return self._decay_add(op, now)

    def _hll_add(self, op: HllAdd, now: float) -> int:
        # One entry per key holds its current bucket; the previous bucket is only ever read when
        # the next one starts (its members are copied into the new bucket's view), so it need not
        # be kept under a key of its own.
        window = op.window
        bucket = int(now // window)
        entry = self._data.get(op.key)
        if entry is None or entry.expires <= now or entry.value[0] != bucket:
            previous = entry.value[1] if (entry is not None and entry.expires > now
                                          and entry.value[0] == bucket - 1) else None
            entry = _Entry(now + 2 * window + 1, (bucket, HyperLogLog(previous)))
            self._data[op.key] = entry
        hll: HyperLogLog = entry.value[1]
        return hll.add_count(op.member, self._hash)

    def _decay_add(self, op: DecayAdd, now: float) -> tuple[float, ...]:
        entry = self._data.get(op.key)
        amounts = op.amounts
        if entry is None or entry.expires <= now:
            self._data[op.key] = _Entry(now + 8 * op.half_life, (now, amounts))
            return amounts
        out = decayed_sums(entry.value, op, now)
        entry.expires = now + 8 * op.half_life
        entry.value = (now, out)
        return out

    async def close(self) -> None:
        self._data.clear()
