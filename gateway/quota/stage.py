"""The quota stage: charge every matched limit in one store call, deny with 429, settle later.

``__call__`` reserves (requests 1, input tokens from the estimate, output tokens from
``max_tokens`` × ``n`` or the configured default, spend priced from both, one concurrency
lease) and sets the rate-limit headers. ``settle`` runs in the pipeline's ``finally``: it
reconciles token/spend reservations with ``ctx.usage`` (an abandoned stream pays for what was
produced; a request that never reached the upstream pays nothing) and releases leases.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from gateway.context import Decision, RequestContext
from gateway.policy.registry import MatchedAction
from gateway.quota.headers import HeaderItem, build_headers
from gateway.quota.limits import CompiledLimit, LimitKind, QuotaAction
from gateway.quota.settings import Price, QuotaSettings
from gateway.store.base import Adjustment, Charge, Clock, LimitState, Receipt, Store
from gateway.store.breaker import FailureMode, GuardedCharge, GuardedStore


@dataclass(frozen=True, slots=True)
class _Planned:
    rule_id: str
    limit: CompiledLimit
    shadow: bool
    mode: FailureMode
    charge: Charge


@dataclass(frozen=True, slots=True)
class _Ticket:
    """What ``settle`` needs: applied receipts and what was reserved."""

    applied: tuple[tuple[_Planned, Receipt], ...]
    backend: str
    input_reserved: int
    price: Price | None


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
                 monotonic: Clock = time.monotonic) -> None:
        self.settings = settings
        self.guard = store if isinstance(store, GuardedStore) else GuardedStore(
            store, breaker=settings.breaker, replicas=settings.replicas, clock=clock, monotonic=monotonic)
        # Tickets keyed by id(ctx): RequestContext is slotted and has no field for stage state;
        # the pipeline holds ctx until settle() pops its ticket, so ids cannot be reused meanwhile.
        self._pending: dict[int, _Ticket] = {}

    @property
    def pending(self) -> int:
        """Requests charged and not yet settled (a gauge; growth means settle is not called)."""
        return len(self._pending)

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        actions = [a for a in getattr(ctx.outcome, "actions", None) or ()
                   if isinstance(a, MatchedAction) and a.name == "quota" and isinstance(a.value, QuotaAction)]
        if not actions:
            return None
        req = ctx.request
        input_est = max(0, req.input_tokens_estimate)
        output_res = (req.max_tokens or self.settings.default_output_tokens) * max(1, req.n)
        price = self.settings.price_for(req.model)
        planned = self._plan(ctx, actions, input_est, output_res, price)
        guarded = await self.guard.charge([p.charge for p in planned], [p.mode for p in planned])
        audit: dict[str, Any] = {"backend": guarded.backend}
        ctx.audit["quota"] = audit
        if guarded.fallback is not None:
            audit["fallback"] = guarded.fallback.value
        if guarded.unavailable:
            retry = max(1, math.ceil(self.settings.breaker.reset_after))
            return Decision(503, "api_error", "Quota store unavailable and the policy fails closed.",
                            rule_id=next(p.rule_id for p in planned if p.mode is FailureMode.CLOSED),
                            headers={"Retry-After": str(retry)}, retryable=True,
                            code="quota_store_unavailable")
        checked = self._checked(planned, guarded)
        audit["limits"] = [{"rule": p.rule_id, "limit": p.limit.name, "kind": p.limit.kind.value,
                            "shadow": p.shadow, "allowed": s.allowed, "remaining": s.remaining}
                           for p, s, _ in checked]
        would_deny = [f"{p.rule_id}/{p.limit.name}" for p, s, _ in checked if p.shadow and not s.allowed]
        if would_deny:
            audit["would_deny"] = would_deny
        headers = build_headers(self._header_items(checked), guarded.result.now if guarded.result else 0.0)
        ctx.response_headers.update(headers)
        denied = [(p, s) for p, s, _ in checked if not p.shadow and not s.allowed]
        if denied:
            audit["denied"] = [f"{p.rule_id}/{p.limit.name}" for p, _ in denied]
            return self._deny(denied, headers)
        applied = tuple((p, r) for p, _, r in checked if r.applied)
        if applied:
            self._pending[id(ctx)] = _Ticket(applied, guarded.backend, input_est, price)
        return None

    def _plan(self, ctx: RequestContext, actions: list[MatchedAction], input_est: int,
              output_res: int, price: Price | None) -> list[_Planned]:
        planned: list[_Planned] = []
        lease_id = f"{ctx.request_id}.{uuid.uuid4().hex[:12]}"
        for action in actions:
            qa: QuotaAction = action.value
            mode = qa.on_store_failure or self.settings.on_store_failure
            for lim in qa.limits:
                seconds = lim.period if lim.period is not None else (lim.lease_ttl or self.settings.lease_ttl)
                charge = Charge(
                    key=lim.identity(action.rule_id, ctx), algorithm=lim.kind.algorithm,
                    limit=lim.limit, period_ms=max(1, math.ceil(seconds * 1000)),
                    cost=cost_of(lim.kind, input_est, output_res, price), burst=lim.burst,
                    shadow=action.shadow,
                    lease_id=lease_id if lim.kind is LimitKind.CONCURRENCY else "")
                planned.append(_Planned(action.rule_id, lim, action.shadow, mode, charge))
        return planned

    @staticmethod
    def _checked(planned: list[_Planned], guarded: GuardedCharge
                 ) -> list[tuple[_Planned, LimitState, Receipt]]:
        if guarded.result is None:
            return []
        r = guarded.result
        return [(planned[i], r.states[k], r.receipts[k]) for k, i in enumerate(guarded.indices)]

    @staticmethod
    def _header_items(checked: list[tuple[_Planned, LimitState, Receipt]]) -> list[HeaderItem]:
        enforced = [(p, s, r) for p, s, r in checked if not p.shadow]
        names = [p.limit.name for p, _, _ in enforced]
        return [HeaderItem(p.limit.name if names.count(p.limit.name) == 1 else f"{p.rule_id}.{p.limit.name}",
                           # the charge's limit may be this replica's share during a local fallback
                           _with_limit(p.limit, r.charge.limit), s)
                for p, s, r in enforced]

    def _deny(self, denied: list[tuple[_Planned, LimitState]], headers: dict[str, str]) -> Decision:
        first, state = max(denied, key=lambda d: d[1].retry_after)
        if math.isinf(state.retry_after):
            return Decision(
                429, "rate_limit",
                f"Request needs {first.charge.cost:,} against limit '{first.limit.name}' of rule "
                f"'{first.rule_id}' ({first.limit.describe()}); it can never fit, reduce max_tokens "
                "or the request size.",
                rule_id=first.rule_id, headers={**headers, "x-should-retry": "false"},
                retryable=False, code="rate_limit_exceeded")
        retry = max(1, math.ceil(state.retry_after))
        return Decision(
            429, "rate_limit",
            f"Rate limit exceeded: limit '{first.limit.name}' of rule '{first.rule_id}' allows "
            f"{first.limit.describe()}. Retry after {retry} seconds.",
            rule_id=first.rule_id,
            headers={**headers, "Retry-After": str(retry),
                     "retry-after-ms": str(max(1, math.ceil(state.retry_after * 1000)))},
            retryable=True, code="rate_limit_exceeded")

    async def settle(self, ctx: RequestContext) -> None:
        """Reconcile reservations with ``ctx.usage`` and release leases; never raises a store
        error (a failed settle is counted and the keys' TTLs bound its effect)."""
        ticket = self._pending.pop(id(ctx), None)
        if ticket is None:
            return
        actual_in, actual_out = self._actual_usage(ctx, ticket)
        adjustments: list[Adjustment] = []
        for planned, receipt in ticket.applied:
            kind = planned.limit.kind
            if kind is LimitKind.CONCURRENCY:
                adjustments.append(Adjustment(receipt, -1))
            elif kind is not LimitKind.REQUESTS:
                delta = cost_of(kind, actual_in, actual_out, ticket.price) - receipt.charge.cost
                if delta:
                    adjustments.append(Adjustment(receipt, delta))
        audit = ctx.audit.setdefault("quota", {})
        audit["settled"] = {"input_tokens": actual_in, "output_tokens": actual_out}
        await self.guard.adjust(adjustments, ticket.backend)

    @staticmethod
    def _actual_usage(ctx: RequestContext, ticket: _Ticket) -> tuple[int, int]:
        usage = ctx.usage
        reported = usage.complete or usage.input_tokens > 0 or usage.output_tokens > 0
        if not reported:
            failed = ctx.upstream_status is not None and ctx.upstream_status >= 400
            if ctx.upstream_started is None or failed:
                return 0, 0  # never reached the model (or it refused): nothing to pay for
        # Input the upstream did not report is assumed consumed as estimated; output is what
        # was produced, so a stream cut short pays for the part that was streamed.
        input_tokens = usage.input_tokens if usage.complete or usage.input_tokens else ticket.input_reserved
        return input_tokens, usage.output_tokens


def _with_limit(limit: CompiledLimit, value: int) -> CompiledLimit:
    if value == limit.limit:
        return limit
    return CompiledLimit(limit.name, limit.kind, value, limit.period, limit.burst, limit.lease_ttl,
                         limit.key_fields, limit.getters)
