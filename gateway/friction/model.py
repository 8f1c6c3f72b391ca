"""Compiled friction actions, how several combine, and their JSON form (stored friction state).

Combination (several matching rules, plus sticky state from earlier requests), strongest first:
``deny`` wins over everything; then a ``reverify`` challenge; then proof of work, at the highest
difficulty asked (``from_risk`` resolves per request, the larger of it and any fixed number); only
a request that gets past those is degraded, charged against every ``cap_tokens`` (each its own
budget) and tarpitted. Degrade flags are OR-ed and its caps take the minimum; tarpit takes the
longest delay and the slowest rate. Where one value must be picked (the ``deny`` status and
message, the ``reverify`` URL, the ``fallback_model``), the first action added wins: the stage adds
the matching rules in policy order, then the account's sticky state in rule-id order, so the
result does not depend on the order a store returns the state in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

FROM_RISK = -1  # PowChallenge.difficulty placeholder: derive from the request's risk score


@dataclass(frozen=True, slots=True)
class PowChallenge:
    difficulty: int = FROM_RISK  # leading zero bits of sha256(solution)


@dataclass(frozen=True, slots=True)
class Reverify:
    url: str


@dataclass(frozen=True, slots=True)
class Degrade:
    strip_logprobs: bool = False
    strip_reasoning: bool = False
    force_n1: bool = False
    cap_max_tokens: int | None = None
    cap_thinking_budget: int | None = None
    fallback_model: str | None = None


@dataclass(frozen=True, slots=True)
class Tarpit:
    first_byte_delay: float = 0.0
    tokens_per_second: float | None = None


@dataclass(frozen=True, slots=True)
class CapTokens:
    """A tighter token budget (input + output tokens) per account or per cluster."""

    limit: int
    per: float
    key: str = "account"  # account | cluster


@dataclass(frozen=True, slots=True)
class DenySpec:
    status: int = 403
    message: str = "This request is not permitted."


@dataclass(frozen=True, slots=True)
class FrictionAction:
    """What one ``friction:`` value asks for; ``ttl`` makes it sticky for the account."""

    pow: PowChallenge | None = None
    reverify: Reverify | None = None
    degrade: Degrade | None = None
    tarpit: Tarpit | None = None
    cap_tokens: CapTokens | None = None
    deny: DenySpec | None = None
    ttl: float | None = None

    def effects(self) -> list[str]:
        names = ("pow", "reverify", "degrade", "tarpit", "cap_tokens", "deny")
        return [n for n in names if getattr(self, n) is not None]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FrictionAction:
        def part(name: str, kind: type[Any]) -> Any:
            raw = data.get(name)
            if not isinstance(raw, dict):
                return None
            # Fields this version does not know (a record saved by a newer replica) are ignored:
            # the rest of the action still applies rather than the whole record being skipped.
            known = {f.name for f in fields(kind)}
            return kind(**{k: v for k, v in raw.items() if k in known})

        return cls(part("pow", PowChallenge), part("reverify", Reverify), part("degrade", Degrade),
                   part("tarpit", Tarpit), part("cap_tokens", CapTokens), part("deny", DenySpec),
                   data.get("ttl"))


@dataclass(slots=True)
class Combined:
    """The merged effect of every friction action that applies to one request."""

    deny: DenySpec | None = None
    deny_rule: str | None = None
    reverify: Reverify | None = None
    reverify_rule: str | None = None
    pow_difficulty: int | None = None  # FROM_RISK or a number; max of those asked
    pow_from_risk: bool = False
    degrade: Degrade | None = None
    tarpit: Tarpit | None = None
    caps: list[tuple[str, CapTokens]] = field(default_factory=list)  # (rule id, cap)

    def add(self, rule_id: str, action: FrictionAction) -> None:
        if action.deny is not None and self.deny is None:
            self.deny, self.deny_rule = action.deny, rule_id
        if action.reverify is not None and self.reverify is None:
            self.reverify, self.reverify_rule = action.reverify, rule_id
        if action.pow is not None:
            if action.pow.difficulty == FROM_RISK:
                self.pow_from_risk = True
            else:
                self.pow_difficulty = max(self.pow_difficulty or 0, action.pow.difficulty)
        if action.degrade is not None:
            self.degrade = _merge_degrade(self.degrade, action.degrade)
        if action.tarpit is not None:
            self.tarpit = _merge_tarpit(self.tarpit, action.tarpit)
        if action.cap_tokens is not None:
            self.caps.append((rule_id, action.cap_tokens))


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _merge_degrade(a: Degrade | None, b: Degrade) -> Degrade:
    if a is None:
        return b
    return Degrade(a.strip_logprobs or b.strip_logprobs, a.strip_reasoning or b.strip_reasoning,
                   a.force_n1 or b.force_n1, _min(a.cap_max_tokens, b.cap_max_tokens),
                   _min(a.cap_thinking_budget, b.cap_thinking_budget), a.fallback_model or b.fallback_model)


def _merge_tarpit(a: Tarpit | None, b: Tarpit) -> Tarpit:
    if a is None:
        return b
    rates = [r for r in (a.tokens_per_second, b.tokens_per_second) if r is not None]
    return Tarpit(max(a.first_byte_delay, b.first_byte_delay), min(rates) if rates else None)
