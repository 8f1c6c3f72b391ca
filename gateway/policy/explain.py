"""Explain a decision rule by rule: matched or not, which condition failed, what decided.

Explain walks every rule linearly (no index) on a copy of the context, so it also serves as an
independent check of the indexed evaluator: both must reach the same decision.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.context import RequestContext
from gateway.policy.evaluate import Outcome, Snapshot, evaluate
from gateway.policy.matchers import AllOf, Cond, Leaf, NotOf, show


def explain_cond(cond: Cond, ctx: Any) -> tuple[bool, str | None]:
    """Whether ``cond`` holds, and if not, the first failing condition with the value it saw."""
    if isinstance(cond, Leaf):
        value = cond.field.getter(ctx)
        if cond.matcher.test(value):
            return True, None
        shown = sorted(value) if isinstance(value, set | frozenset) else value
        return False, f"{cond.field.path} {cond.matcher.text} (value: {show(shown)})"
    if isinstance(cond, NotOf):
        ok, _ = explain_cond(cond.item, ctx)
        return (False, f"not ({describe(cond.item)}) (it matched)") if ok else (True, None)
    if isinstance(cond, AllOf):
        for item in cond.items:
            ok, why = explain_cond(item, ctx)
            if not ok:
                return False, why
        return True, None
    reasons = []
    for item in cond.items:
        ok, why = explain_cond(item, ctx)
        if ok:
            return True, None
        reasons.append(why or "")
    return False, "none of: " + "; ".join(reasons)


def describe(cond: Cond) -> str:
    """A condition tree as one readable line."""
    if isinstance(cond, Leaf):
        return f"{cond.field.path} {cond.matcher.text}"
    if isinstance(cond, NotOf):
        return f"not ({describe(cond.item)})"
    word = " and " if isinstance(cond, AllOf) else " or "
    return "always" if not cond.items else word.join(f"({describe(i)})" for i in cond.items)


def _copy(ctx: RequestContext) -> RequestContext:
    # Evaluation adds tags to the context; explaining must not change the caller's request.
    return dataclasses.replace(ctx, tags=set(ctx.tags))


def explain(snapshot: Snapshot, ctx: RequestContext) -> dict[str, Any]:
    """A JSON-ready account of how ``snapshot`` decides ``ctx`` (for the CLI and admin API)."""
    outcome: Outcome = evaluate(snapshot, _copy(ctx))
    walk = _copy(ctx)
    rules: list[dict[str, Any]] = []
    decided_by: str | None = None
    for rule in snapshot.rules:
        entry: dict[str, Any] = {
            "id": rule.id, "file": rule.file, "line": rule.mark.line,
            "mode": "shadow" if rule.shadow else "enforce", "when": describe(rule.cond),
        }
        if decided_by is not None:
            entry.update(result="not evaluated", reason=f"decided by '{decided_by}' above")
            rules.append(entry)
            continue
        ok, why = explain_cond(rule.cond, walk)
        entry["result"] = "matched" if ok else "no match"
        if not ok:
            entry["failed"] = why
        else:
            entry["terminal"] = rule.terminal
            entry["actions"] = [a.name for a in rule.actions]
            if not rule.shadow:
                walk.tags.update(rule.tags)  # later rules may test tags set by earlier ones
                if rule.terminal is not None:
                    decided_by = rule.id
        rules.append(entry)
    return {
        "revision": snapshot.revision,
        "decision": outcome.decision,
        "rule_id": outcome.rule_id,
        "default": outcome.rule_id is None,
        "status": outcome.deny.status if outcome.deny else None,
        "message": outcome.deny.message if outcome.deny else None,
        "matched": outcome.matched,
        "tags": outcome.tags,
        "actions": [{"rule": a.rule_id, "action": a.name, "shadow": a.shadow} for a in outcome.actions],
        "shadow": [{"rule": h.rule_id, "would": h.would} for h in outcome.shadow],
        "would_decide": outcome.would_decide,
        "consistent": decided_by == outcome.rule_id,
        "rules": rules,
    }


def format_explain(report: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`explain` for ``gateway policy explain``."""
    lines = [f"policy revision {report['revision']}"]
    for rule in report["rules"]:
        head = f"  [{rule['result']:>13}] {rule['id']} ({rule['file']}:{rule['line']}, {rule['mode']})"
        lines.append(head)
        if "failed" in rule:
            lines.append(f"                  failed: {rule['failed']}")
        elif "reason" in rule:
            pass
        elif rule.get("terminal") or rule.get("actions"):
            what = [rule["terminal"]] if rule.get("terminal") else []
            lines.append(f"                  actions: {', '.join(what + rule['actions'])}")
    by = f"rule '{report['rule_id']}'" if report["rule_id"] else "the default decision"
    status = f" ({report['status']}: {report['message']})" if report["status"] else ""
    lines.append(f"decision: {report['decision']}{status} by {by}")
    if report["tags"]:
        lines.append(f"tags: {', '.join(report['tags'])}")
    if report["shadow"]:
        hits = ", ".join(f"{h['rule']}→{h['would'] or 'actions'}" for h in report["shadow"])
        lines.append(f"shadow: {hits}; would decide: {report['would_decide'] or 'the same'}")
    return "\n".join(lines)
