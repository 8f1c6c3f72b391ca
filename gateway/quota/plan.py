"""Quota plans: what the stage works out once per combination of matched quota rules.

A policy snapshot builds its ``MatchedAction`` objects once, so every request matching the same
rules brings the same objects; the stage keeps one :class:`Plan` per combination (found by the
actions' ids) with each limit's :class:`LimitSlot`, the header layout, the audit template and the
memos of store keys and charges (:class:`KeyEntry`, :class:`Combo`) that requests then reuse.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from gateway.policy.registry import MatchedAction
from gateway.quota.headers import HeaderLayout
from gateway.quota.limits import CompiledLimit, LimitKind, QuotaAction
from gateway.quota.settings import Price, QuotaSettings
from gateway.store.base import Charge
from gateway.store.breaker import FailureMode


class LimitSlot:
    """One limit of one matched quota rule: everything about it that is fixed by the policy
    snapshot, worked out once per plan instead of once per request."""

    __slots__ = ("algorithm", "end", "entries", "getters", "kind", "kind_text", "limit", "mode", "name",
                 "period_ms", "rule_id", "shadow", "start")

    def __init__(self, action: MatchedAction, limit: CompiledLimit, mode: FailureMode,
                 default_lease_ttl: float) -> None:
        self.rule_id: str = action.rule_id
        self.shadow: bool = action.shadow
        self.limit = limit
        self.mode = mode
        self.getters = limit.getters
        self.kind = limit.kind
        self.kind_text = limit.kind.value
        self.algorithm = limit.kind.algorithm
        seconds = limit.period if limit.period is not None else (limit.lease_ttl or default_lease_ttl)
        self.period_ms = max(1, math.ceil(seconds * 1000))
        self.name = limit.name  # in the headers; qualified with the rule id when shared (below)
        # This slot's key values within the plan's values tuple (set by the plan).
        self.start = self.end = 0
        # Key values (the one value, or a tuple of them) → store key and last charge. Per slot, so
        # that a new combination of values (an account on a new network) still finds each key.
        self.entries: dict[Any, KeyEntry] = {}


class Plan:
    """The static part of the stage's work for one combination of matched quota rules. A policy
    snapshot builds its ``MatchedAction`` objects once, so every request matching the same rules
    brings the same objects and finds its plan by their ids (``actions`` pins them)."""

    __slots__ = ("actions", "admitted_audit", "combos", "enforced_only", "fast", "getters", "headers",
                 "lease_slots", "matched", "modes", "reusable", "settle_slots", "slots")

    def __init__(self, matched: list[Any], settings: QuotaSettings) -> None:
        self.matched = matched  # every action the rules contributed (the memo key's objects)
        actions = tuple(a for a in matched if isinstance(a, MatchedAction) and a.name == "quota"
                        and isinstance(a.value, QuotaAction))
        self.actions = actions
        slots: list[LimitSlot] = []
        for action in actions:
            qa: QuotaAction = action.value
            mode = qa.on_store_failure or settings.on_store_failure
            slots.extend(LimitSlot(action, lim, mode, settings.lease_ttl) for lim in qa.limits)
        enforced = [s for s in slots if not s.shadow]
        qualify(enforced)
        self.slots = tuple(slots)
        self.modes = tuple(s.mode for s in slots)
        # Headers when the shared store answered every charge (the usual case); a local fallback
        # answers a subset with scaled limits and builds its headers from the items instead.
        self.headers = HeaderLayout([(s.name, s.limit) for s in enforced]) if enforced else None
        # The usual case, done without per-limit branching: every limit enforced, all admitted.
        self.enforced_only = bool(slots) and len(enforced) == len(slots)
        self.fast = self.enforced_only and self.headers is not None
        self.admitted_audit = admitted_audit(slots)
        self.settle_slots = tuple((i, s.kind) for i, s in enumerate(slots)
                                  if s.kind is not LimitKind.REQUESTS)
        self.lease_slots = tuple(i for i, s in enumerate(slots) if s.kind is LimitKind.CONCURRENCY)
        # Every key getter of every slot, in order: their values are the combination memo's key.
        self.getters = tuple(g for s in slots for g in s.getters)
        at = 0
        for slot in slots:
            slot.start, slot.end = at, at + len(slot.getters)
            at = slot.end
        # Key values → store keys and the last charges built for them (see QuotaStage._charges).
        self.combos: dict[tuple[Any, ...], Combo] = {}
        # Without leases (a new lease id per request), equal costs mean equal charges.
        self.reusable = not self.lease_slots


class KeyEntry:
    """Memo for one limit slot and key values: the store key and the last charge built for it,
    reused while its cost is unchanged (always, for request rates: cost 1)."""

    __slots__ = ("charge", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self.charge: Charge | None = None


class Combo:
    """Memo for one plan and one combination of key values: the last charges tuple built, reused
    whole while the request's cost inputs are unchanged (always, for plans of request rates). The
    tuple stays the same object, so the store can memoise its encoding by identity."""

    __slots__ = ("charges", "inputs")

    def __init__(self, charges: tuple[Charge, ...], inputs: tuple[int, int, Price | None]) -> None:
        self.charges = charges
        self.inputs = inputs


def limit_audit(slot: LimitSlot, allowed: bool, remaining: int) -> dict[str, Any]:
    """One limit's entry in the audit record's ``quota.limits``."""
    return {"rule": slot.rule_id, "limit": slot.limit.name, "kind": slot.kind_text, "shadow": slot.shadow,
            "allowed": allowed, "remaining": remaining}


def admitted_audit(slots: list[LimitSlot]) -> bytes:
    """``quota.limits`` of a request every limit of ``slots`` admitted, as serialised JSON with a
    ``%d`` for each limit's remaining units: the audit record gets it as an ``orjson.Fragment``,
    the same bytes ``orjson`` would write for the list of :func:`limit_audit` dicts, without
    building them (a request's three limits cost more as dicts than the rest of the stage's audit).
    """
    entries = [orjson.dumps(limit_audit(slot, True, 0)).replace(b"%", b"%%") for slot in slots]
    assert all(entry.endswith(b'"remaining":0}') for entry in entries)  # the last key, as built
    return b"[" + b",".join(entry[:-2] + b"%d}" for entry in entries) + b"]"


def qualify(slots: list[LimitSlot]) -> None:
    """A limit name used by several rules is qualified with its rule id in the headers."""
    names = [slot.name for slot in slots]
    for slot in slots:
        if names.count(slot.name) > 1:
            slot.name = f"{slot.rule_id}.{slot.name}"
