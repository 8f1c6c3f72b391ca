"""The quota stage: charge every matched limit in one store call, deny with 429, settle later.

``__call__`` reserves (requests 1, input tokens from the estimate, output tokens from
``max_tokens`` × ``n`` or the configured default, spend priced from both, one concurrency
lease) and sets the rate-limit headers. ``settle`` runs in the pipeline's ``finally``: it
reconciles token/spend reservations with ``ctx.usage`` (an abandoned stream pays for what was
produced; a request that never reached the upstream pays nothing) and releases leases.

Concurrency leases have a TTL so that a crashed gateway cannot leak slots; a stream may outlive
it. The stage therefore keeps the leases of the requests in flight and one background task renews
all of them in one store call every ``lease_ttl / 3`` (the shortest lease TTL seen, if a limit sets
its own), so a lease only expires once its gateway stopped renewing it (crash, store unreachable
for longer than the TTL). The task starts with the first lease and stops in ``guard.close()``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.context import Decision, RequestContext
from gateway.policy.registry import MatchedAction
from gateway.quota.headers import HeaderBuilder, HeaderItem
from gateway.quota.limits import CompiledLimit, LimitKind, QuotaAction
from gateway.quota.settings import Price, QuotaSettings
from gateway.store.base import Adjustment, Charge, Clock, LimitState, Receipt, Store
from gateway.store.breaker import FailureMode, GuardedStore

log = logging.getLogger(__name__)

# Renewals per lease TTL: a lease is renewed when at most a third of its TTL has passed, so one
# failed or late round still leaves it live until the next one.
RENEWALS_PER_TTL = 3

# Bound on the per-stage memo of store keys (one entry per rule × limit × key values seen
# recently); when full the oldest entry goes, so a flood of distinct keys costs a rebuild each.
KEY_MEMO_ENTRIES = 16384

# One planned charge: (rule id, limit, shadow, failure mode, charge, kind text). A tuple, not a
# dataclass: one is built per limit per request.
_Planned = tuple[str, CompiledLimit, bool, FailureMode, Charge, str]
# What ``settle`` needs: (applied (limit kind, receipt) pairs, backend, input reserved, price).
_Ticket = tuple[tuple[tuple[LimitKind, Receipt], ...], str, int, Price | None]


class _KeyEntry:
    """Memo for one (rule, limit, shadow, key values): the store key and the last charge built
    for it, reused while its cost is unchanged (always, for request rates: cost 1)."""

    __slots__ = ("algorithm", "charge", "key", "kind", "limit", "period_ms")

    def __init__(self, limit: CompiledLimit, key: str, period_ms: int) -> None:
        self.limit = limit  # also pins id(limit), part of the memo key, while the entry lives
        self.key = key
        self.period_ms = period_ms
        self.kind = limit.kind.value
        self.algorithm = limit.kind.algorithm
        self.charge: Charge | None = None


def cost_of(kind: LimitKind, input_tokens: int, output_tokens: int, price: Price | None) -> int:
    """Store units one request costs under a limit kind (micro-USD for spend)."""
    if kind is LimitKind.INPUT_TOKENS:
        return input_tokens
    if kind is LimitKind.OUTPUT_TOKENS:
        return output_tokens
    if kind is LimitKind.TOTAL_TOKENS:
        return input_tokens + output_tokens
    if kind is LimitKind.SPEND:
        # USD per million tokens × tokens = micro-USD
        return math.ceil(input_tokens * price.input + output_tokens * price.output) if price else 0
    return 1


class QuotaStage:
    """Pipeline stage for ``quota`` actions; one instance per gateway process."""

    def __init__(self, store: Store | GuardedStore, settings: QuotaSettings, clock: Clock = time.time,
                 monotonic: Clock = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self.guard = store if isinstance(store, GuardedStore) else GuardedStore(
            store, breaker=settings.breaker, replicas=settings.replicas, clock=clock, monotonic=monotonic)
        # Tickets keyed by id(ctx): RequestContext is slotted and has no field for stage state;
        # the pipeline holds ctx until settle() pops its ticket, so ids cannot be reused meanwhile.
        self._pending: dict[int, _Ticket] = {}
        self._keys: dict[tuple[str, int, bool, tuple[str | None, ...]], _KeyEntry] = {}
        self._headers = HeaderBuilder()
        # Lease ids: unique per request across replicas without a uuid4 per request.
        self._lease_nonce = os.urandom(6).hex()
        self._lease_seq = itertools.count(1)
        self._prices: dict[str | None, Price | None] = {}  # settings.price_for, memoised per model
        # Lease renewal: the applied lease receipts of each request in flight (keyed like
        # _pending) with the backend that holds them; one task renews them all.
        self._leases: dict[int, tuple[tuple[Receipt, ...], str]] = {}
        self._sleep = sleep  # injected: tests drive the renewal loop without waiting
        self._lease_basis = settings.lease_ttl  # shortest lease TTL seen (s): cadence = this / 3
        self._renewer: asyncio.Task[None] | None = None
        self._renewing = False
        self._closed = False
        self.guard.on_close(self.stop_renewal)

    @property
    def pending(self) -> int:
        """Requests charged and not yet settled (a gauge; growth means settle is not called)."""
        return len(self._pending)

    @property
    def renewal_interval(self) -> float:
        """Seconds between lease renewal rounds."""
        return self._lease_basis / RENEWALS_PER_TTL

    @property
    def leases(self) -> int:
        """Requests in flight holding leases that are being renewed."""
        return len(self._leases)

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        matched = getattr(ctx.outcome, "actions", None)
        if not matched:
            return None
        actions = [a for a in matched
                   if isinstance(a, MatchedAction) and a.name == "quota" and isinstance(a.value, QuotaAction)]
        if not actions:
            return None
        req = ctx.request
        input_est = max(0, req.input_tokens_estimate)
        output_res = (req.max_tokens or self.settings.default_output_tokens) * max(1, req.n)
        price = self._price(req.model) if self.settings.prices else None
        planned, charges, modes = self._plan(ctx, actions, input_est, output_res, price)
        guarded = await self.guard.charge(charges, modes)
        audit: dict[str, Any] = {"backend": guarded.backend}
        ctx.audit["quota"] = audit
        if guarded.fallback is not None:
            audit["fallback"] = guarded.fallback.value
        if guarded.unavailable:
            retry = max(1, math.ceil(self.settings.breaker.reset_after))
            return Decision(503, "api_error", "Quota store unavailable and the policy fails closed.",
                            rule_id=next(p[0] for p in planned if p[3] is FailureMode.CLOSED),
                            headers={"Retry-After": str(retry)}, retryable=True,
                            code="quota_store_unavailable")
        result = guarded.result
        limits_audit: list[dict[str, Any]] = []
        audit["limits"] = limits_audit
        would_deny: list[str] = []
        items: list[HeaderItem] = []
        denied: list[tuple[_Planned, LimitState]] = []
        applied: list[tuple[LimitKind, Receipt]] = []
        leases: list[Receipt] = []
        if result is not None:
            states, receipts = result.states, result.receipts
            for k, i in enumerate(guarded.indices):
                p, state, receipt = planned[i], states[k], receipts[k]
                rule_id, lim, shadow = p[0], p[1], p[2]
                limits_audit.append({"rule": rule_id, "limit": lim.name, "kind": p[5],
                                     "shadow": shadow, "allowed": state.allowed,
                                     "remaining": state.remaining})
                if shadow:
                    if not state.allowed:
                        would_deny.append(f"{rule_id}/{lim.name}")
                else:
                    # the charge's limit may be this replica's share during a local fallback
                    limit = receipt.charge.limit
                    items.append(HeaderItem(lim.name, lim if limit == lim.limit else _with_limit(lim, limit),
                                            state))
                    if not state.allowed:
                        denied.append((p, state))
                if receipt.applied:
                    applied.append((lim.kind, receipt))
                    if lim.kind is LimitKind.CONCURRENCY:
                        leases.append(receipt)
            if len(items) > 1:
                items = _qualify(items, [planned[i][0] for i in guarded.indices if not planned[i][2]])
        if would_deny:
            audit["would_deny"] = would_deny
        headers = self._headers.build(items, result.now if result is not None else 0.0)
        ctx.response_headers.update(headers)
        if denied:
            audit["denied"] = [f"{p[0]}/{p[1].name}" for p, _ in denied]
            return self._deny(denied, headers)
        if applied:
            self._pending[id(ctx)] = (tuple(applied), guarded.backend, input_est, price)
            if leases:
                self._track(id(ctx), tuple(leases), guarded.backend)
        return None

    # ---- lease renewal ------------------------------------------------------------------
    def _track(self, key: int, leases: tuple[Receipt, ...], backend: str) -> None:
        self._leases[key] = (leases, backend)
        shortest = min(r.charge.period_ms for r in leases) / 1000.0
        task = self._renewer
        if shortest < self._lease_basis:  # a limit with its own, shorter lease_ttl
            self._lease_basis = shortest
            if task is not None and not task.done() and not self._renewing:
                task.cancel()  # asleep on the longer cadence: start over on the new one
                task = None
            # (a round in progress goes on; its loop sleeps the new interval afterwards)
        if task is None or task.done():
            self._start_renewal()

    def _start_renewal(self) -> None:
        if not self._closed:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="quota-lease-renewal")

    async def _renew_loop(self) -> None:
        while True:
            await self._sleep(self.renewal_interval)
            try:
                await self.renew_leases()
            except Exception:  # a bug must not stop renewals; store errors never get here
                self.guard.stats.renew_failures += 1
                log.exception("lease renewal round failed")

    async def renew_leases(self) -> None:
        """One renewal round: every lease of every request in flight, in one store call per
        backend (``Store.renew``). A store failure is counted (``renew_failures``) and the leases
        run out their TTL; a lease the store reports gone while its request still runs (it
        expired during an outage) is counted in ``leases_lost`` and no longer renewed."""
        if not self._leases:
            return
        batches: dict[str, list[tuple[int, Receipt]]] = {}
        for key, (leases, backend) in self._leases.items():
            batch = batches.setdefault(backend, [])
            batch.extend((key, r) for r in leases)
        self._renewing = True
        try:
            for backend, batch in batches.items():
                renewed = await self.guard.renew([r for _, r in batch], backend)
                if renewed is None:
                    continue
                for (key, receipt), ok in zip(batch, renewed, strict=True):
                    if not ok:
                        self._lost(key, receipt)
        finally:
            self._renewing = False

    def _lost(self, key: int, receipt: Receipt) -> None:
        entry = self._leases.get(key)
        if entry is None or not any(r is receipt for r in entry[0]):
            return  # settled meanwhile: released, not lost
        self.guard.stats.leases_lost += 1
        rest = tuple(r for r in entry[0] if r is not receipt)
        if rest:
            self._leases[key] = (rest, entry[1])
        else:
            del self._leases[key]

    async def stop_renewal(self) -> None:
        """Cancel the renewal task for good (run by ``guard.close()``); leases left open then
        expire after their TTL."""
        self._closed = True
        task, self._renewer = self._renewer, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    async def close(self) -> None:
        """Stop renewing and close the store (``guard.close()``)."""
        await self.guard.close()

    def _price(self, model: str | None) -> Price | None:
        try:
            return self._prices[model]
        except KeyError:
            if len(self._prices) >= KEY_MEMO_ENTRIES:
                self._prices.clear()
            price = self._prices[model] = self.settings.price_for(model)
            return price

    def _plan(self, ctx: RequestContext, actions: list[MatchedAction], input_est: int,
              output_res: int, price: Price | None
              ) -> tuple[list[_Planned], list[Charge], list[FailureMode]]:
        planned: list[_Planned] = []
        charges: list[Charge] = []
        modes: list[FailureMode] = []
        memo = self._keys
        lease_id = ""
        for action in actions:
            qa: QuotaAction = action.value
            mode = qa.on_store_failure or self.settings.on_store_failure
            rule_id, shadow = action.rule_id, action.shadow
            for lim in qa.limits:
                getters = lim.getters
                values = (getters[0](ctx),) if len(getters) == 1 else tuple([g(ctx) for g in getters])
                memo_key = (rule_id, id(lim), shadow, values)
                entry = memo.get(memo_key)
                if entry is None or entry.limit is not lim:
                    entry = self._remember(memo_key, rule_id, lim, ctx)
                kind = lim.kind
                if kind is LimitKind.REQUESTS:
                    cost = 1
                elif kind is LimitKind.CONCURRENCY:
                    cost = 1
                    if not lease_id:
                        lease_id = f"{ctx.request_id}.{self._lease_nonce}{next(self._lease_seq):x}"
                else:
                    cost = cost_of(kind, input_est, output_res, price)
                charge = entry.charge
                if charge is None or charge.cost != cost or kind is LimitKind.CONCURRENCY:
                    charge = Charge(key=entry.key, algorithm=entry.algorithm, limit=lim.limit,
                                    period_ms=entry.period_ms, cost=cost, burst=lim.burst, shadow=shadow,
                                    lease_id=lease_id if kind is LimitKind.CONCURRENCY else "")
                    entry.charge = charge
                planned.append((rule_id, lim, shadow, mode, charge, entry.kind))
                charges.append(charge)
                modes.append(mode)
        return planned, charges, modes

    def _remember(self, memo_key: tuple[str, int, bool, tuple[str | None, ...]], rule_id: str,
                  lim: CompiledLimit, ctx: RequestContext) -> _KeyEntry:
        memo = self._keys
        if len(memo) >= KEY_MEMO_ENTRIES:
            del memo[next(iter(memo))]  # oldest first
        seconds = lim.period if lim.period is not None else (lim.lease_ttl or self.settings.lease_ttl)
        entry = _KeyEntry(lim, lim.identity(rule_id, ctx), max(1, math.ceil(seconds * 1000)))
        memo[memo_key] = entry
        return entry

    def _deny(self, denied: list[tuple[_Planned, LimitState]], headers: dict[str, str]) -> Decision:
        first, state = max(denied, key=lambda d: d[1].retry_after)
        rule_id, lim, charge = first[0], first[1], first[4]
        if math.isinf(state.retry_after):
            return Decision(
                429, "rate_limit",
                # The rule id goes to the audit record only, never to the client.
                f"Request needs {charge.cost:,} against limit '{lim.name}' ({lim.describe()}); "
                "it can never fit, reduce max_tokens or the request size.",
                rule_id=rule_id, headers={**headers, "x-should-retry": "false"},
                retryable=False, code="rate_limit_exceeded")
        retry = max(1, math.ceil(state.retry_after))
        return Decision(
            429, "rate_limit",
            f"Rate limit exceeded: limit '{lim.name}' allows {lim.describe()}. "
            f"Retry after {retry} seconds.",
            rule_id=rule_id,
            headers={**headers, "Retry-After": str(retry),
                     "retry-after-ms": str(max(1, math.ceil(state.retry_after * 1000)))},
            retryable=True, code="rate_limit_exceeded")

    async def settle(self, ctx: RequestContext) -> None:
        """Reconcile reservations with ``ctx.usage`` and release leases; never raises a store
        error (a failed settle is counted and the keys' TTLs bound its effect)."""
        ticket = self._pending.pop(id(ctx), None)
        if ticket is None:
            return
        # Before the release: no later renewal round includes this lease (one already in flight
        # cannot revive it: Store.renew only extends leases still held).
        self._leases.pop(id(ctx), None)
        applied, backend, input_reserved, price = ticket
        actual_in, actual_out = self._actual_usage(ctx, input_reserved)
        adjustments: list[Adjustment] = []
        for kind, receipt in applied:
            if kind is LimitKind.REQUESTS:
                continue
            if kind is LimitKind.CONCURRENCY:
                adjustments.append(Adjustment(receipt, -1))
            else:
                delta = cost_of(kind, actual_in, actual_out, price) - receipt.charge.cost
                if delta:
                    adjustments.append(Adjustment(receipt, delta))
        audit = ctx.audit.setdefault("quota", {})
        audit["settled"] = {"input_tokens": actual_in, "output_tokens": actual_out}
        # Nothing to reconcile (request rates, exact reservations): no round trip. Otherwise
        # queued when the store can batch it (see docs/quotas.md for the delay bound).
        if adjustments and not self.guard.adjust_soon(adjustments, backend):
            await self.guard.adjust(adjustments, backend)

    @staticmethod
    def _actual_usage(ctx: RequestContext, input_reserved: int) -> tuple[int, int]:
        usage = ctx.usage
        reported = usage.complete or usage.input_tokens > 0 or usage.output_tokens > 0
        if not reported:
            failed = ctx.upstream_status is not None and ctx.upstream_status >= 400
            if ctx.upstream_started is None or failed:
                return 0, 0  # never reached the model (or it refused): nothing to pay for
        # Input the upstream did not report is assumed consumed as estimated; output is what
        # was produced, so a stream cut short pays for the part that was streamed.
        input_tokens = usage.input_tokens if usage.complete or usage.input_tokens else input_reserved
        return input_tokens, usage.output_tokens


def _qualify(items: list[HeaderItem], rule_ids: list[str]) -> list[HeaderItem]:
    """A limit name used by several rules is qualified with its rule id in the headers."""
    names = [item.name for item in items]
    if len(set(names)) == len(names):
        return items
    return [item if names.count(item.name) == 1 else item._replace(name=f"{rule_id}.{item.name}")
            for item, rule_id in zip(items, rule_ids, strict=True)]


def _with_limit(limit: CompiledLimit, value: int) -> CompiledLimit:
    if value == limit.limit:
        return limit
    return CompiledLimit(limit.name, limit.kind, value, limit.period, limit.burst, limit.lease_ttl,
                         limit.key_fields, limit.getters)
