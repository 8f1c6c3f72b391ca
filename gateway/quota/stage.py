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

import orjson

from gateway.context import ApiFamily, Decision, RequestContext
from gateway.memo import make_room
from gateway.quota.headers import MS_SLACK, HeaderBuilder, HeaderItem
from gateway.quota.limits import CompiledLimit, LimitKind
from gateway.quota.plan import Combo, KeyEntry, LimitSlot, Plan, limit_audit
from gateway.quota.renewal import LeaseRenewer
from gateway.quota.settings import Price, QuotaSettings
from gateway.settling import SettlesNow, consumed_usage
from gateway.store.base import (
    Adjustment,
    Charge,
    ChargeResult,
    Clock,
    LimitState,
    Receipt,
    Store,
    new_named,
)
from gateway.store.breaker import FailureMode, GuardedStore

log = logging.getLogger(__name__)

# Bound on each limit's memo of store keys (one entry per key values seen recently); when full
# the oldest eighth goes (gateway.memo), so a flood of distinct keys costs a rebuild each.
KEY_MEMO_ENTRIES = 16384
# Bound on the memo of plans (one per combination of matched quota rules; a handful per policy).
PLAN_MEMO_ENTRIES = 1024


# What ``settle`` needs: (applied (limit kind, receipt) pairs other than request rates, backend,
# input reserved, price, whether leases are being renewed).
_Ticket = tuple[tuple[tuple[LimitKind, Receipt], ...], str, int, Price | None, bool]


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


class QuotaStage(SettlesNow):
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
        self._plans: dict[tuple[int, ...], Plan] = {}
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
        plan = self._plan_for(matched)
        if not plan.slots:
            return None
        req = ctx.request
        input_est = max(0, req.input_tokens_estimate) if req.billed else 0
        output_res = (req.max_tokens or self.settings.default_output_tokens) * max(1, req.n) \
            if req.generates else 0
        price = self._price(req.model) if self.settings.prices else None
        charges = self._charges(ctx, plan, input_est, output_res, price)
        guarded = await self.guard.charge(charges, plan.modes)
        result = guarded.result
        if plan.fast and guarded.backend == "store" and result is not None and result.allowed:
            self._admitted(ctx, plan, result, input_est, price)
            return None
        audit: dict[str, Any] = {"backend": guarded.backend}
        ctx.audit["quota"] = audit
        if guarded.fallback is not None:
            audit["fallback"] = guarded.fallback.value
        if guarded.unavailable:
            retry = max(1, math.ceil(self.settings.breaker.reset_after))
            return Decision(503, "api_error", "Quota store unavailable and the policy fails closed.",
                            rule_id=next(s.rule_id for s in plan.slots if s.mode is FailureMode.CLOSED),
                            headers={"Retry-After": str(retry)}, retryable=True,
                            code="quota_store_unavailable")
        if result is None:  # failed open: nothing was checked, nothing to advertise or settle
            audit["limits"] = []
            return None
        limits_audit: list[dict[str, Any]] = []
        audit["limits"] = limits_audit
        would_deny: list[str] = []
        shown: list[LimitState] = []  # states of the enforced limits, in plan order
        denied: list[tuple[LimitSlot, Charge, LimitState]] = []
        applied: list[tuple[LimitKind, Receipt]] = []  # what settle may adjust
        leases: list[Receipt] = []
        slots = plan.slots
        for state, receipt, i in zip(result.states, result.receipts, guarded.indices, strict=True):
            slot = slots[i]
            shadow = slot.shadow
            limits_audit.append(limit_audit(slot, state.allowed, state.remaining))
            if shadow:
                if not state.allowed:
                    would_deny.append(f"{slot.rule_id}/{slot.limit.name}")
            else:
                shown.append(state)
                if not state.allowed:
                    denied.append((slot, receipt.charge, state))
            if receipt.applied:
                kind = slot.kind
                if kind is not LimitKind.REQUESTS:  # a request rate has nothing to settle
                    applied.append((kind, receipt))
                    if kind is LimitKind.CONCURRENCY:
                        leases.append(receipt)
        if would_deny:
            audit["would_deny"] = would_deny
        if not shown:
            headers: dict[str, str] = {}
        elif guarded.backend == "store" and plan.headers is not None:
            # every charge answered, with the limits as compiled: the plan's layout fits
            headers = plan.headers.render(shown, result.now, req.api, self._headers.times)
        else:
            headers = self._fallback_headers(plan, guarded.indices, result, req.api)
        ctx.response_headers.update(headers)
        if denied:
            audit["denied"] = [f"{slot.rule_id}/{slot.limit.name}" for slot, _, _ in denied]
            return self._deny(denied, headers)
        # A ticket when something may need settling (tokens, spend, leases); settle then audits
        # the usage it settled to, even when it equals the reservation.
        if applied:
            self._pending[id(ctx)] = (tuple(applied), guarded.backend, input_est, price, bool(leases))
            if leases:
                self.renewer.track(id(ctx), tuple(leases), guarded.backend)
        return None

    def _admitted(self, ctx: RequestContext, plan: Plan, result: ChargeResult, input_est: int,
                  price: Price | None) -> None:
        """:meth:`__call__` when the shared store admitted every limit and none is in shadow
        mode (the common case): the same audit, headers and ticket, without per-limit branches."""
        states = result.states
        ctx.audit["quota"] = {"backend": "store", "limits": orjson.Fragment(
            plan.admitted_audit % tuple([state.remaining for state in states]))}
        assert plan.headers is not None  # checked by the caller
        plan.headers.render(states, result.now, ctx.request.api, self._headers.times, ctx.response_headers)
        if not plan.settle_slots:  # request rates only: nothing to settle
            return
        receipts = result.receipts
        key = id(ctx)
        self._pending[key] = (tuple([(kind, receipts[i]) for i, kind in plan.settle_slots]), "store",
                              input_est, price, bool(plan.lease_slots))
        if plan.lease_slots:
            self.renewer.track(key, tuple([receipts[i] for i in plan.lease_slots]), "store")

    def _fallback_headers(self, plan: Plan, indices: tuple[int, ...], result: ChargeResult,
                          api: ApiFamily) -> dict[str, str]:
        """Headers for a local fallback: the limits it answered, at the per-replica share."""
        items: list[HeaderItem] = []
        rule_ids: list[str] = []
        for state, receipt, i in zip(result.states, result.receipts, indices, strict=True):
            slot = plan.slots[i]
            if slot.shadow:
                continue
            limit = receipt.charge.limit
            lim = slot.limit
            items.append(HeaderItem(lim.name, lim if limit == lim.limit else _with_limit(lim, limit), state))
            rule_ids.append(slot.rule_id)
        if len(items) > 1:
            names = [item.name for item in items]
            if len(set(names)) < len(names):
                items = [item if names.count(item.name) == 1 else item._replace(name=f"{rule_id}.{item.name}")
                         for item, rule_id in zip(items, rule_ids, strict=True)]
        return self._headers.build(items, result.now, api)

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

    def _plan_for(self, matched: list[Any]) -> Plan:
        """The plan for the actions the rules contributed (quota or not: the memo key is every
        action's id, so finding it needs no filtering); a plan without slots means no quota."""
        memo_key = tuple(map(id, matched))
        plan = self._plans.get(memo_key)
        # List equality tries identity first, so this is cheap for the same objects; equal but
        # distinct actions (a reload that changed nothing here) would plan the same anyway.
        if plan is None or plan.matched != matched:
            plans = self._plans
            make_room(plans, PLAN_MEMO_ENTRIES)
            plan = plans[memo_key] = Plan(list(matched), self.settings)
        return plan

    def _charges(self, ctx: RequestContext, plan: Plan, input_est: int, output_res: int,
                 price: Price | None) -> tuple[Charge, ...]:
        values = tuple([getter(ctx) for getter in plan.getters])
        if not plan.reusable:  # leases: a new lease id per request
            return self._build(ctx, plan, values, input_est, output_res, price)
        inputs = (input_est, output_res, price)
        combos = plan.combos
        combo = combos.get(values)
        if combo is not None and combo.inputs == inputs:
            return combo.charges
        charges = self._build(ctx, plan, values, input_est, output_res, price)
        if combo is None:
            make_room(combos, KEY_MEMO_ENTRIES)
            combos[values] = Combo(charges, inputs)
        else:
            combo.charges, combo.inputs = charges, inputs
        return charges

    def _build(self, ctx: RequestContext, plan: Plan, values: tuple[Any, ...], input_est: int,
               output_res: int, price: Price | None) -> tuple[Charge, ...]:
        """The charges of a combination of key values not seen with these cost inputs. Each slot
        keeps its own memo of keys and charges, so a new combination (an account on a new
        network) still reuses each slot's key and, when its cost is unchanged, its charge object
        (the store's encoding memo is keyed by it)."""
        charges: list[Charge] = []
        lease_id = ""
        for slot in plan.slots:
            lim = slot.limit
            start = slot.start
            value = values[start] if slot.end == start + 1 else values[start:slot.end]
            memo = slot.entries
            entry = memo.get(value)
            if entry is None:
                make_room(memo, KEY_MEMO_ENTRIES)
                entry = memo[value] = KeyEntry(
                    lim.identity_of(slot.rule_id, (value,) if slot.end == start + 1 else value))
            kind = slot.kind
            charge = entry.charge
            if kind is LimitKind.REQUESTS:
                if charge is None:
                    charge = entry.charge = Charge(entry.key, slot.algorithm, lim.limit, slot.period_ms, 1,
                                                   lim.burst, slot.shadow)
            elif kind is LimitKind.CONCURRENCY:
                if not lease_id:
                    lease_id = f"{ctx.request_id}.{self._lease_nonce}{next(self._lease_seq):x}"
                charge = Charge(entry.key, slot.algorithm, lim.limit, slot.period_ms, 1, lim.burst,
                                slot.shadow, lease_id)
            else:
                cost = cost_of(kind, input_est, output_res, price)
                if charge is None or charge.cost != cost:
                    charge = entry.charge = Charge(entry.key, slot.algorithm, lim.limit, slot.period_ms,
                                                   cost, lim.burst, slot.shadow)
            charges.append(charge)
        return tuple(charges)

    def _deny(self, denied: list[tuple[LimitSlot, Charge, LimitState]], headers: dict[str, str]) -> Decision:
        slot, charge, state = max(denied, key=lambda d: d[2].retry_after)
        rule_id, lim = slot.rule_id, slot.limit
        # OpenAI's 429 body names the unit of the limit hit. Spend is priced from tokens (fewer
        # tokens help), concurrency counts requests in flight (only fewer requests help).
        unit = "requests" if slot.kind in (LimitKind.REQUESTS, LimitKind.CONCURRENCY) else "tokens"
        if math.isinf(state.retry_after):
            return Decision(
                429, "rate_limit",
                # The rule id goes to the audit record only, never to the client.
                f"Request needs {charge.cost:,} against limit '{lim.name}' ({lim.describe()}); "
                "it can never fit, reduce max_tokens or the request size.",
                rule_id=rule_id, headers={**headers, "x-should-retry": "false"},
                retryable=False, code="rate_limit_exceeded", openai_type=unit)
        retry = max(1, math.ceil(state.retry_after))
        # Stores compute whole milliseconds (seconds = ms / 1000): the slack (far below a
        # millisecond) absorbs the float error that would turn 2007 ms into 2007.0000000000002
        # and round it up to 2008.
        retry_ms = max(1, math.ceil(state.retry_after * 1000 - MS_SLACK))
        return Decision(
            429, "rate_limit",
            f"Rate limit exceeded: limit '{lim.name}' allows {lim.describe()}. "
            f"Retry after {retry} seconds.",
            rule_id=rule_id,
            headers={**headers, "Retry-After": str(retry),
                     "retry-after-ms": str(retry_ms)},
            retryable=True, code="rate_limit_exceeded", openai_type=unit)

    def settle_now(self, ctx: RequestContext) -> Awaitable[None] | None:
        """Reconcile reservations with ``ctx.usage`` and release leases: at once when the store
        can queue it, otherwise the store call to await. Never raises a store error (a failed
        settle is counted and the keys' TTLs bound its effect)."""
        ticket = self._pending.pop(id(ctx), None)
        if ticket is None:
            return None
        applied, backend, input_reserved, price, leases = ticket
        if leases:
            # Before the release: no later renewal round includes this lease (one already in
            # flight cannot revive it: Store.renew only extends leases still held).
            self.renewer.forget(id(ctx))
        actual_in, actual_out = consumed_usage(ctx, input_reserved)
        adjustments: list[Adjustment] = []
        for kind, receipt in applied:
            if kind is LimitKind.CONCURRENCY:
                adjustments.append(new_named(Adjustment, (receipt, -1)))
            else:
                delta = cost_of(kind, actual_in, actual_out, price) - receipt.charge.cost
                if delta:
                    adjustments.append(new_named(Adjustment, (receipt, delta)))
        audit = ctx.audit.get("quota")
        if audit is None:
            audit = ctx.audit["quota"] = {}
        audit["settled"] = {"input_tokens": actual_in, "output_tokens": actual_out}
        # Nothing to reconcile (request rates, exact reservations): no round trip. Otherwise
        # queued when the store can batch it (see docs/quotas.md for the delay bound).
        if adjustments and not self.guard.adjust_soon(adjustments, backend):
            return self.guard.adjust(adjustments, backend)
        return None


def _with_limit(limit: CompiledLimit, value: int) -> CompiledLimit:
    if value == limit.limit:
        return limit
    return CompiledLimit(limit.name, limit.kind, value, limit.period, limit.burst, limit.lease_ttl,
                         limit.key_fields, limit.getters)
