"""The friction stage (after quota): applies the ``friction`` actions the policy accumulated.

Sources: enforced ``friction`` actions of ``ctx.outcome.actions`` and the account's sticky
friction state (see :mod:`gateway.friction.state`). Shadow actions are never applied; what they
would have done goes to ``ctx.audit["friction"]["would"]``. Order: deny → reverify → proof of
work → degrade → ``cap_tokens`` (charged after degrade caps ``max_tokens``) → tarpit.
Every applied friction is audited with the risk figures that led to it (never prompt text).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.context import Decision, RequestContext
from gateway.friction.challenge import SOLUTION_HEADER, ChallengeIssuer, Verdict, difficulty_for
from gateway.friction.degrade import apply_degrade
from gateway.friction.model import CapTokens, Combined, FrictionAction
from gateway.friction.state import FrictionState
from gateway.risk.settings import ChallengeSettings
from gateway.risk.sigstore import SignalStore
from gateway.settling import SettlesNow
from gateway.store.base import Adjustment, Algorithm, Charge, Receipt, Store, StoreError

DEFAULT_OUTPUT_ESTIMATE = 1024


def _deny_kind(status: int) -> str:
    return {401: "authentication", 403: "permission", 404: "not_found", 429: "rate_limit"}.get(
        status, "invalid_request" if status < 500 else "unavailable")


class FrictionStage(SettlesNow):
    """Applies friction; returns a Decision for deny, challenges and exhausted token caps."""

    def __init__(self, signals: SignalStore, store: Store, settings: ChallengeSettings,
                 clock: Callable[[], float] = time.time) -> None:
        self._state = FrictionState(signals, clock)
        self._store = store
        self._settings = settings
        self._issuer = ChallengeIssuer(settings.secret, settings.ttl, clock)
        # id(ctx) → (receipts, estimate): request ids come from clients and may repeat.
        self._receipts: dict[int, tuple[list[Receipt], int]] = {}

    @property
    def state(self) -> FrictionState:
        return self._state

    @property
    def issuer(self) -> ChallengeIssuer:
        return self._issuer

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        outcome_actions = getattr(ctx.outcome, "actions", None) or ()
        mine = [a for a in outcome_actions if a.name == "friction" and isinstance(a.value, FrictionAction)]
        account = ctx.principal.account
        sticky: dict[str, FrictionAction] = {}
        if account and ctx.risk.signals.get("friction_active"):
            try:
                sticky = {rid: action for rid, (action, _r) in (await self._state.load(account)).items()}
            except StoreError:
                sticky = {}
        if not mine and not sticky:
            return None
        combined = Combined()
        audit: dict[str, Any] = {"applied": [], "would": []}
        for matched in mine:
            action: FrictionAction = matched.value
            if matched.shadow:
                audit["would"].append({"rule": matched.rule_id, "effects": action.effects()})
                continue
            combined.add(matched.rule_id, action)
            audit["applied"].append(matched.rule_id)
            if account and (action.ttl or action.reverify) and matched.rule_id not in sticky:
                try:
                    await self._state.save(account, matched.rule_id, action)
                except StoreError:
                    audit["state_error"] = True
        for rule_id, action in sticky.items():
            if rule_id not in audit["applied"]:
                combined.add(rule_id, action)
                audit["applied"].append(f"{rule_id} (sticky)")
        if audit["applied"]:
            risk = ctx.risk
            audit["risk"] = {"score": risk.score, "cluster_score": risk.cluster_score,
                             "cluster_id": risk.cluster_id,
                             **{k: v for k, v in risk.signals.items() if k.startswith("s_")}}
        ctx.audit["friction"] = audit
        return await self._apply(ctx, combined, audit)

    async def _apply(self, ctx: RequestContext, c: Combined, audit: dict[str, Any]) -> Decision | None:
        if c.deny is not None:
            audit["effect"] = "deny"
            return Decision(status=c.deny.status, error_type=_deny_kind(c.deny.status),
                            message=c.deny.message)
        if c.reverify is not None:
            audit["effect"] = "reverify"
            return Decision(
                status=403, error_type="challenge", code="reverification_required",
                message="Additional verification is required for this account.",
                headers={"WWW-Authenticate": f'Tollgate-Reverify url="{c.reverify.url}"'},
                extra={"challenge": {"kind": "reverify", "url": c.reverify.url}},
            )
        if c.pow_difficulty is not None or c.pow_from_risk:
            decision = await self._pow(ctx, c, audit)
            if decision is not None:
                return decision
        if c.degrade is not None:
            audit["degrade"] = apply_degrade(ctx, c.degrade)
        if c.caps:
            decision = await self._caps(ctx, c.caps, audit)
            if decision is not None:
                return decision
        if c.tarpit is not None:
            ctx.first_byte_delay = max(ctx.first_byte_delay, c.tarpit.first_byte_delay)
            rate = c.tarpit.tokens_per_second
            if rate is not None:
                pace = ctx.pace_tokens_per_s
                ctx.pace_tokens_per_s = rate if pace is None else min(pace, rate)
            audit["tarpit"] = {"delay": ctx.first_byte_delay, "rate": ctx.pace_tokens_per_s}
        return None

    def _principal(self, ctx: RequestContext) -> str:
        p = ctx.principal
        return p.account or p.key_id or (str(ctx.client.ip) if ctx.client.ip else "anonymous")

    async def _pow(self, ctx: RequestContext, c: Combined, audit: dict[str, Any]) -> Decision | None:
        s = self._settings
        required = c.pow_difficulty or 0
        if c.pow_from_risk:
            risk = max(ctx.risk.score, ctx.risk.cluster_score)
            required = max(required, difficulty_for(risk, s.min_difficulty, s.max_difficulty))
        principal = self._principal(ctx)
        solution = ctx.request.headers.get(SOLUTION_HEADER)
        if solution:
            try:
                verdict = await self._issuer.verify(solution, principal, required, self._store.set_if_absent)
            except StoreError:
                verdict = Verdict.REPLAYED  # cannot prove it is fresh: ask again (fail closed)
            audit["pow"] = verdict.value
            if verdict is Verdict.OK:
                return None
        else:
            audit["pow"] = "issued"
        challenge = self._issuer.issue(principal, required)
        audit["effect"] = "pow"
        audit["difficulty"] = required
        return Decision(
            status=401, error_type="challenge", code="challenge_required",
            message=f"Proof of work required: solve the challenge and send the solution in the "
                    f"{SOLUTION_HEADER} header.",
            headers={"WWW-Authenticate": challenge.header()},
            extra={"challenge": challenge.body()},
        )

    async def _caps(self, ctx: RequestContext, caps: list[tuple[str, CapTokens]],
                    audit: dict[str, Any]) -> Decision | None:
        view = ctx.request
        estimate = view.input_tokens_estimate + (view.max_tokens or DEFAULT_OUTPUT_ESTIMATE)
        charges = []
        for rule_id, cap in caps:
            who = ctx.risk.cluster_id if cap.key == "cluster" else ctx.principal.account
            who = who or self._principal(ctx)
            charges.append(Charge(key=f"friction:{rule_id}:cap:{cap.key}:{who}", algorithm=Algorithm.WINDOW,
                                  limit=cap.limit, period_ms=int(cap.per * 1000), cost=estimate))
        try:
            result = await self._store.charge(charges)
        except StoreError:
            audit["cap_tokens"] = "store_error"
            return None  # caps are friction, not quota: fail open, counted in the audit
        if result.allowed:
            self._receipts[id(ctx)] = (list(result.receipts), estimate)
            audit["cap_tokens"] = "charged"
            return None
        retry = max((st.retry_after for st in result.states if not st.allowed), default=1.0)
        retry_s = 3600 if math.isinf(retry) else max(1, math.ceil(retry))
        audit["cap_tokens"] = "exhausted"
        return Decision(status=429, error_type="rate_limit", message="Token budget exhausted for now.",
                        headers={"Retry-After": str(retry_s)}, retryable=True)

    def settle_now(self, ctx: RequestContext) -> Awaitable[None] | None:
        """Reconcile the cap_tokens reservation with the usage actually produced: the store call
        to await, if this request made one."""
        held = self._receipts.pop(id(ctx), None)
        if held is None:
            return None
        receipts, estimate = held
        delta = ctx.usage.total_tokens - estimate
        if delta:
            return self._store.adjust([Adjustment(r, delta) for r in receipts if r.applied])
        return None
