"""Evaluate one request against an immutable compiled snapshot.

Combination rule (see docs/policy-reference.md): rules run in order (files sorted by path, rules
in file order). Every matching *enforced* rule contributes its non-terminal actions (tags,
quota, friction...) to ``Outcome.actions`` and its tags to ``ctx.tags``; the first matching
enforced rule with a terminal action (allow/deny) decides, and no rule after it is evaluated.
Matching *shadow* rules never act: their would-be decision is recorded in ``Outcome.shadow``
and their non-terminal actions are passed on flagged ``shadow=True``. If no enforced terminal
rule matched, ``settings.default`` decides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.context import Decision, RequestContext
from gateway.policy.builtin_actions import DenyResponse
from gateway.policy.matchers import Cond, Leaf
from gateway.policy.registry import MatchedAction
from gateway.policy.schema import NamedList
from gateway.yamlsource import Issue, Mark

if TYPE_CHECKING:
    from gateway.policy.testing import TestCase


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to run; actions are pre-built so evaluation allocates nothing for them."""

    pos: int
    id: str
    description: str
    file: str
    mark: Mark
    shadow: bool
    cond: Cond
    predicate: Callable[[Any], bool]
    # The rule's condition minus its index leaf: a candidate taken from the leaf's bucket already
    # satisfies that leaf, so evaluation skips it (equal to ``predicate`` for unindexed rules).
    residual: Callable[[Any], bool]
    index_leaf: Leaf | None
    terminal: str | None  # "allow" | "deny" | another terminal action name | None
    terminal_value: Any
    actions: tuple[MatchedAction, ...]  # non-terminal, in the order written
    tags: tuple[str, ...]
    deny: DenyResponse | None  # resolved against settings.deny when terminal == "deny"


@dataclass(frozen=True, slots=True)
class RuleIndex:
    """Rule positions bucketed by the value of one equality/in condition per rule.

    A rule whose condition requires ``field ∈ S`` can only match when the request's value is in
    S, so it is filed under each value of S; rules with no such condition are ``always``
    candidates. Candidates are merged back into rule order, preserving the combination rule.
    """

    always: tuple[int, ...]
    fields: tuple[tuple[str, Callable[[Any], Any], Mapping[Any, tuple[int, ...]]], ...]

    def candidates(self, ctx: RequestContext) -> Sequence[int]:
        parts: list[Sequence[int]] = [self.always] if self.always else []
        for _path, getter, buckets in self.fields:
            try:
                hit = buckets.get(getter(ctx))
            except TypeError:  # unhashable value: no equality rule on this field can match
                continue
            if hit:
                parts.append(hit)
        if not parts:
            return ()
        if len(parts) == 1:
            return parts[0]
        # Each part is sorted and a rule sits in one part only; timsort merges sorted runs cheaply.
        return sorted([p for part in parts for p in part])


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One compiled, immutable policy set; shared by all requests while it is current."""

    revision: str
    rules: tuple[CompiledRule, ...]
    index: RuleIndex
    default_decision: str
    default_deny: DenyResponse
    mode: str
    lists: Mapping[str, NamedList]
    files: tuple[str, ...]
    warnings: tuple[Issue, ...] = ()
    tests: tuple[TestCase, ...] = ()
    enforced_rules: frozenset[str] = frozenset()  # ids of the rules that are not shadow

    def rule(self, rule_id: str) -> CompiledRule | None:
        return next((r for r in self.rules if r.id == rule_id), None)


@dataclass(frozen=True, slots=True)
class ShadowHit:
    """A shadow rule that matched: what it would have done (``would`` is an action name)."""

    rule_id: str
    would: str | None  # terminal action it would have taken, None when it has only non-terminal ones


@dataclass(slots=True)
class Outcome:
    """The result of evaluating one request."""

    decision: str  # "allow" | "deny"
    rule_id: str | None  # the deciding rule; None when the default decided
    deny: Decision | None
    revision: str
    matched: list[str] = field(default_factory=list)  # enforced rules that matched, in order
    actions: list[MatchedAction] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)  # tags this evaluation added (enforced rules)
    shadow: list[ShadowHit] = field(default_factory=list)
    terminal: str | None = None  # the deciding rule's terminal action name (e.g. an extension's)
    # The snapshot's enforced rule ids: state saved by a rule (sticky friction) applies only while
    # that rule is enforced in the revision this request was decided by.
    enforced_rules: frozenset[str] = frozenset()

    @property
    def would_decide(self) -> str | None:
        """The decision had shadow rules been enforced, when it differs from ``decision``."""
        for hit in self.shadow:
            if hit.would is not None:
                would = "deny" if hit.would == "deny" else "allow"
                return would if would != self.decision else None
        return None

    @property
    def would_rule_id(self) -> str | None:
        return next((h.rule_id for h in self.shadow if h.would is not None), None)


def evaluate(snapshot: Snapshot, ctx: RequestContext) -> Outcome:
    """Evaluate ``ctx``; tags of matching enforced rules are added to ``ctx.tags`` as we go."""
    rules = snapshot.rules
    matched: list[str] = []
    actions: list[MatchedAction] = []
    added: list[str] = []
    shadow: list[ShadowHit] = []
    decided: CompiledRule | None = None
    for pos in snapshot.index.candidates(ctx):
        rule = rules[pos]
        if not rule.residual(ctx):
            continue
        if rule.shadow:
            shadow.append(ShadowHit(rule.id, rule.terminal))
            actions.extend(rule.actions)
            continue
        matched.append(rule.id)
        if rule.actions:
            actions.extend(rule.actions)
        for tag in rule.tags:
            if tag not in ctx.tags:
                ctx.tags.add(tag)
                added.append(tag)
        if rule.terminal is not None:
            decided = rule
            break
    if decided is None:
        deny = snapshot.default_deny.decision(None) if snapshot.default_decision == "deny" else None
        return Outcome(snapshot.default_decision, None, deny, snapshot.revision, matched, actions,
                       added, shadow, None, snapshot.enforced_rules)
    if decided.deny is not None:
        return Outcome("deny", decided.id, decided.deny.decision(decided.id), snapshot.revision,
                       matched, actions, added, shadow, decided.terminal, snapshot.enforced_rules)
    return Outcome("allow", decided.id, None, snapshot.revision, matched, actions, added, shadow,
                   decided.terminal, snapshot.enforced_rules)
