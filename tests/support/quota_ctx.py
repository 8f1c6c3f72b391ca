"""Hand-built request contexts and matched quota actions for quota tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from gateway.context import ApiFamily, Principal, RequestContext, RequestView
from gateway.policy.registry import MatchedAction
from gateway.quota.limits import CompiledLimit, LimitKind, QuotaAction, key_getter
from gateway.store.breaker import FailureMode


@dataclass
class Outcome:
    """Stands in for gateway.policy.evaluate.Outcome: the stage only reads ``.actions``."""

    actions: list[MatchedAction] = field(default_factory=list)


def limit(name: str, kind: LimitKind | str, amount: int, per: float | None = 60.0, *,
          burst: int = 1, key: tuple[str, ...] = ("principal.account",),
          lease_ttl: float | None = None) -> CompiledLimit:
    getters = tuple(g for g in (key_getter(k) for k in key) if g is not None)
    kind = LimitKind(kind)
    period = None if kind is LimitKind.CONCURRENCY else per
    return CompiledLimit(name, kind, amount, period, burst, lease_ttl, key, getters)


def quota(rule_id: str, *limits: CompiledLimit, shadow: bool = False,
          on_store_failure: FailureMode | None = None) -> MatchedAction:
    return MatchedAction(rule_id, "quota", QuotaAction(tuple(limits), on_store_failure), shadow)


def make_ctx(*actions: MatchedAction, account: str = "acct-1", model: str = "gpt-4o",
             input_tokens: int = 100, max_tokens: int | None = 200, n: int = 1,
             api: ApiFamily = ApiFamily.OPENAI) -> RequestContext:
    route, path = (("messages", "/v1/messages") if api is ApiFamily.ANTHROPIC
                   else ("chat.completions", "/v1/chat/completions"))
    view = RequestView(api=api, route=route, path=path,
                       method="POST", headers={}, model=model, max_tokens=max_tokens, n=n,
                       input_tokens_estimate=input_tokens)
    ctx = RequestContext(request_id=f"req-{uuid.uuid4().hex[:8]}", request=view,
                         principal=Principal(authenticated=True, account=account))
    ctx.outcome = Outcome(list(actions))
    return ctx
