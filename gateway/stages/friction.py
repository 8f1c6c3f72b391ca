"""The friction stage (after quota): applies the ``friction`` actions the policy accumulated.

Sources: enforced ``friction`` actions of ``ctx.outcome.actions`` (policy order) and the account's
sticky friction state (see :mod:`gateway.friction.state`; rule-id order), combined as
:mod:`gateway.friction.model` documents. Shadow actions are never applied; what they would have
done goes to ``ctx.audit["friction"]["would"]``. Order: deny → reverify → proof of work →
degrade → ``cap_tokens`` (charged after degrade caps ``max_tokens``) → tarpit.

A proof-of-work solution is checked in its place (form, MAC, expiry, difficulty, work: no I/O)
but *spent* (``Store.set_if_absent``, the replay guard) only after ``cap_tokens``, the last check
that can refuse: a request the cap refuses keeps its solution good for the retry. If the spend
finds it spent already (a replay, or two requests racing with one solution) the request is
challenged again and the ``cap_tokens`` reservation it made is refunded in full at settle, like
any request that never reached the model. Store calls per request are unchanged: one for the
spend, one for the caps, none for a request that brings no solution.

Audit (``ctx.audit["friction"]``, never prompt text): ``applied`` (rule, its effects, sticky or
not), ``would`` (shadow rules), ``saved`` (sticky state this request created), ``effect`` (the
answer that stopped the request: deny, reverify, pow, cap_tokens), ``pow`` (issued, the verdict
on a solution, or ``unspent``: valid but kept because ``cap_tokens`` refused) with
``difficulty``, ``cap_tokens`` (per budget: allowed, remaining; the reservation and what was
settled), ``tarpit`` and the risk figures that led to it.

``cap_tokens`` is reserved and reconciled like a quota token budget: the reservation (input
estimate + ``max_tokens`` × ``n``, or 1,024 output tokens when ``max_tokens`` is absent) is checked
and charged in one atomic store call for every cap of the request, all or none, and settled at the
end of the response to what was consumed (a stream cut short pays for the output streamed and the
input; a request that never reached the model, or that the model refused, pays nothing). A request
stopped before this stage (quota, deny, challenge) charges nothing (a replayed solution is only
found after the charge, which settle refunds). Concurrent requests therefore
never *reserve* past a cap; what they consume can exceed it only by what each request in flight
uses beyond its own reservation (output past an absent ``max_tokens``' 1,024, or input above the
estimate), so with ``max_tokens`` set the overshoot is bounded by the input estimate's error. A
reservation larger than the whole cap can never fit: 429, not retryable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.context import Decision, RequestContext
from gateway.friction.action import MAX_DELAY, MAX_RATE, MIN_RATE
from gateway.friction.challenge import SOLUTION_HEADER, ChallengeIssuer, Checked, Verdict, difficulty_for
from gateway.friction.degrade import apply_degrade
from gateway.friction.model import CapTokens, Combined, FrictionAction
from gateway.friction.state import FrictionState
from gateway.risk.settings import ChallengeSettings
from gateway.risk.sigstore import SignalStore
from gateway.settling import SettlesNow, consumed_usage
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
        # id(ctx) → (receipts, input reserved, total reserved): request ids come from clients
        # and may repeat; the pipeline settles every request it ran this stage for.
        self._receipts: dict[int, tuple[list[Receipt], int, int]] = {}

    @property
    def state(self) -> FrictionState:
        return self._state

    @property
    def issuer(self) -> ChallengeIssuer:
        return self._issuer

    @property
    def pending(self) -> int:
        """cap_tokens reservations not settled yet (requests in flight)."""
        return len(self._receipts)

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        outcome_actions = getattr(ctx.outcome, "actions", None) or ()
        mine = [a for a in outcome_actions if a.name == "friction" and isinstance(a.value, FrictionAction)]
        account = ctx.principal.account
        audit: dict[str, Any] = {"applied": [], "would": []}
        sticky: dict[str, FrictionAction] = {}
        if account and ctx.risk.signals.get("friction_active"):
            try:
                saved = await self._state.load(account)
                # Rule-id order: the store's field order is its own, the combination must not be.
                sticky = {rid: saved[rid][0] for rid in sorted(saved)}
            except StoreError:
                audit["state_error"] = "load"  # sticky friction not applied: fail open, audited
            sticky = self._still_enforced(ctx, sticky, audit)
        if not mine and not sticky:
            if audit.get("state_error") or audit.get("suspended"):
                ctx.audit["friction"] = audit
            return None
        combined = Combined()
        applied: set[str] = set()
        for matched in mine:
            action: FrictionAction = matched.value
            if matched.shadow:
                audit["would"].append({"rule": matched.rule_id, "effects": action.effects(),
                                       **({"ttl": action.ttl} if action.ttl else {})})
                continue
            combined.add(matched.rule_id, action)
            applied.add(matched.rule_id)
            audit["applied"].append({"rule": matched.rule_id, "effects": action.effects()})
            if account and (action.ttl or action.reverify) and matched.rule_id not in sticky:
                try:
                    record = await self._state.save(account, matched.rule_id, action, self._why(ctx))
                    audit.setdefault("saved", []).append({"rule": matched.rule_id,
                                                          "expires": record["expires"]})
                except StoreError:
                    audit["state_error"] = "save"
        for rule_id, action in sticky.items():
            if rule_id not in applied:
                combined.add(rule_id, action)
                audit["applied"].append({"rule": rule_id, "effects": action.effects(), "sticky": True})
        if audit["applied"]:
            risk = ctx.risk
            audit["risk"] = {"score": risk.score, "cluster_score": risk.cluster_score,
                             "cluster_id": risk.cluster_id,
                             **{k: v for k, v in risk.signals.items() if k.startswith("s_")}}
        ctx.audit["friction"] = audit
        return await self._apply(ctx, combined, audit)

    @staticmethod
    def _still_enforced(ctx: RequestContext, sticky: dict[str, FrictionAction],
                        audit: dict[str, Any]) -> dict[str, FrictionAction]:
        """The sticky records whose rule is enforced in the policy revision deciding this request.

        A rule an operator switched to shadow or removed (a false positive, say) stops applying
        its saved friction at once, for every account, without a clear per account; the record
        stays until its ttl, so re-enforcing the rule within it resumes the friction.
        """
        enforced = getattr(ctx.outcome, "enforced_rules", None)
        if enforced is None or not sticky:  # no policy stage: nothing to check against
            return sticky
        suspended = [rid for rid in sticky if rid not in enforced]
        if not suspended:
            return sticky
        audit["suspended"] = suspended
        return {rid: action for rid, action in sticky.items() if rid in enforced}

    @staticmethod
    def _why(ctx: RequestContext) -> dict[str, Any]:
        """What a saved sticky record keeps of the request that saved it (for the listing)."""
        risk = ctx.risk
        return {"request_id": ctx.request_id,
                "risk": {"score": round(risk.score, 4), "cluster_score": round(risk.cluster_score, 4),
                         "cluster_id": risk.cluster_id}}

    async def _apply(self, ctx: RequestContext, c: Combined, audit: dict[str, Any]) -> Decision | None:
        if c.deny is not None:
            audit["effect"] = "deny"
            return Decision(status=c.deny.status, error_type=_deny_kind(c.deny.status),
                            message=c.deny.message, rule_id=c.deny_rule)
        if c.reverify is not None:
            audit["effect"] = "reverify"
            return Decision(
                status=403, error_type="challenge", code="reverification_required",
                message="Additional verification is required for this account.",
                rule_id=c.reverify_rule,
                headers={"WWW-Authenticate": f'Tollgate-Reverify url="{c.reverify.url}"'},
                extra={"challenge": {"kind": "reverify", "url": c.reverify.url}},
            )
        unspent: Checked | None = None  # a valid proof of work, spent once nothing refuses
        required = 0
        if c.pow_difficulty is not None or c.pow_from_risk:
            required = self._difficulty(ctx, c, audit)
            unspent = self._check_pow(ctx, required, audit)
            if unspent is None:
                return self._challenge(ctx, required, audit)
        if c.degrade is not None:
            audit["degrade"] = apply_degrade(ctx, c.degrade)
        if c.caps:
            decision = await self._caps(ctx, c.caps, audit)
            if decision is not None:
                if unspent is not None:
                    audit["pow"] = "unspent"  # still good: the client retries with it
                return decision
        if unspent is not None and not await self._spend(unspent, audit):
            # The reservation _caps may have made stays held: settle refunds it in full, as for
            # any request that never reached the model.
            return self._challenge(ctx, required, audit)
        if c.tarpit is not None:
            # Clamped again here: sticky records were validated by the policy that saved them,
            # which may have had other bounds (or the store was written by hand).
            delay = min(MAX_DELAY, max(0.0, c.tarpit.first_byte_delay))
            ctx.first_byte_delay = max(ctx.first_byte_delay, delay)
            rate = c.tarpit.tokens_per_second
            if rate is not None:
                rate = MIN_RATE if math.isnan(rate) else min(MAX_RATE, max(MIN_RATE, rate))
                pace = ctx.pace_tokens_per_s
                ctx.pace_tokens_per_s = rate if pace is None else min(pace, rate)
            audit["tarpit"] = {"delay": ctx.first_byte_delay, "rate": ctx.pace_tokens_per_s}
        return None

    def _principal(self, ctx: RequestContext) -> str:
        p = ctx.principal
        return p.account or p.key_id or (str(ctx.client.ip) if ctx.client.ip else "anonymous")

    def _difficulty(self, ctx: RequestContext, c: Combined, audit: dict[str, Any]) -> int:
        s = self._settings
        required = c.pow_difficulty or 0
        if c.pow_from_risk:
            risk = max(ctx.risk.score, ctx.risk.cluster_score)
            required = max(required, difficulty_for(risk, s.min_difficulty, s.max_difficulty))
        audit["difficulty"] = required
        return required

    def _check_pow(self, ctx: RequestContext, required: int, audit: dict[str, Any]) -> Checked | None:
        """The request's solution if it is valid (not yet spent); None to answer a challenge."""
        solution = ctx.request.headers.get(SOLUTION_HEADER)
        if not solution:
            audit["pow"] = "issued"
            return None
        checked = self._issuer.check(solution, self._principal(ctx), required)
        audit["pow"] = checked.verdict.value
        return checked if checked.verdict is Verdict.OK else None

    async def _spend(self, checked: Checked, audit: dict[str, Any]) -> bool:
        """Mark a valid solution used, last, once nothing else in this stage refuses the request:
        a refusal after the work was checked (a cap_tokens budget) leaves it good for the retry.
        False if it was spent already (a replay, possibly racing this very request)."""
        try:
            fresh = await self._store.set_if_absent(checked.replay_key, checked.ttl)
        except StoreError:
            fresh = False  # cannot prove it is fresh: ask again (fail closed)
            audit["pow_store_error"] = True
        if not fresh:
            audit["pow"] = Verdict.REPLAYED.value
        return fresh

    def _challenge(self, ctx: RequestContext, required: int, audit: dict[str, Any]) -> Decision:
        challenge = self._issuer.issue(self._principal(ctx), required)
        audit["effect"] = "pow"
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
        input_est = max(0, view.input_tokens_estimate) if view.billed else 0
        output_est = (view.max_tokens or DEFAULT_OUTPUT_ESTIMATE) * max(1, view.n) if view.generates else 0
        estimate = input_est + output_est
        note: dict[str, Any] = {"reserved": estimate}
        audit["cap_tokens"] = note
        if estimate == 0:
            note["result"] = "nothing_to_reserve"  # no model runs (models, count_tokens)
            return None
        charges = []
        for rule_id, cap in caps:
            who = ctx.risk.cluster_id if cap.key == "cluster" else ctx.principal.account
            who = who or self._principal(ctx)
            charges.append(Charge(key=f"friction:{rule_id}:cap:{cap.key}:{who}", algorithm=Algorithm.WINDOW,
                                  limit=cap.limit, period_ms=int(cap.per * 1000), cost=estimate))
        try:
            result = await self._store.charge(charges)
        except StoreError:
            note["result"] = "store_error"
            return None  # caps are friction, not quota: fail open, counted in the audit
        states = list(zip(caps, result.states, strict=True))
        note["caps"] = [{"rule": rule_id, "key": cap.key, "limit": cap.limit, "allowed": st.allowed,
                         "remaining": st.remaining} for (rule_id, cap), st in states]
        if result.allowed:
            self._receipts[id(ctx)] = (list(result.receipts), input_est, estimate)
            note["result"] = "charged"
            return None
        denied = [(rule_id, st) for (rule_id, _cap), st in states if not st.allowed]
        rule_id, state = max(denied, key=lambda d: d[1].retry_after)
        audit["effect"] = "cap_tokens"
        if math.isinf(state.retry_after):
            note["result"] = "never_fits"
            return Decision(status=429, error_type="rate_limit", rule_id=rule_id, retryable=False,
                            message=f"This request reserves {estimate:,} tokens, more than this "
                                    f"account's token budget allows at all: reduce max_tokens or the "
                                    f"request size.")
        note["result"] = "exhausted"
        retry_s = max(1, math.ceil(state.retry_after))
        return Decision(status=429, error_type="rate_limit", message="Token budget exhausted for now.",
                        rule_id=rule_id, headers={"Retry-After": str(retry_s)}, retryable=True)

    def settle_now(self, ctx: RequestContext) -> Awaitable[None] | None:
        """Reconcile the cap_tokens reservation with the tokens consumed: the store call to
        await, if this request made one."""
        held = self._receipts.pop(id(ctx), None)
        if held is None:
            return None
        receipts, input_reserved, estimate = held
        consumed = sum(consumed_usage(ctx, input_reserved))
        note = ctx.audit.get("friction", {}).get("cap_tokens")
        if isinstance(note, dict):
            note["settled"] = consumed
        delta = consumed - estimate
        if delta:
            return self._store.adjust([Adjustment(r, delta) for r in receipts if r.applied])
        return None
