"""The quota stage: charge every matched limit in one store call, deny with 429, settle later.

``__call__`` reserves (requests 1, input tokens from the estimate, output tokens from
``max_tokens`` × ``n`` or the configured default, spend priced from both, one concurrency
lease) and sets the rate-limit headers. ``settle`` runs in the pipeline's ``finally``: it
reconciles token/spend reservations with ``ctx.usage`` (an abandoned stream pays for what was
produced; a request that never reached the upstream pays nothing) and releases leases.

Concurrency leases of the requests in flight are renewed by :mod:`gateway.quota.renewal`.
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
from gateway.quota.renewal import LeaseRenewer
from gateway.quota.settings import Price, QuotaSettings
from gateway.store.base import Adjustment, Charge, Clock, LimitState, Receipt, Store
from gateway.store.breaker import FailureMode, GuardedStore

log = logging.getLogger(__name__)

# Renewals per lease TTL: a lease is renewed when at most a third of its TTL has passed, so one
# failed or late round still leaves it live until the next one.

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
        # Leases of the requests in flight (keyed like _pending), renewed in the background.
        self.renewer = LeaseRenewer(self.guard, settings.lease_ttl, sleep)
        self.guard.on_close(self.renewer.stop)

    @property
    def pending(self) -> int:
        """Requests charged and not yet settled (a gauge; growth means settle is not called)."""
        return len(self._pending)

    @property
    def renewal_interval(self) -> float:
        """Seconds between lease renewal rounds."""
        return self.renewer.interval

    @property
    def leases(self) -> int:
        """Requests in flight holding leases that are being renewed."""
        return self.renewer.tracked

    async def renew_leases(self) -> None:
        """One renewal round now (see :meth:`LeaseRenewer.renew`)."""
        await self.renewer.renew()

    async def stop_renewal(self) -> None:
        await self.renewer.stop()

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
                self.renewer.track(id(ctx), tuple(leases), guarded.backend)
        return None

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
        self.renewer.forget(id(ctx))
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
