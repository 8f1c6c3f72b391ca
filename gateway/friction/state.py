"""Sticky friction state per account (in the signal store, with TTL), its history and admin handlers.

A friction action with a ``ttl`` (and every ``reverify`` challenge, default 30 days) is saved
under the account when first applied, with why: the rule, when, the request and the risk figures
that led to it. While saved it applies to every request of the account, whether or not the rule
still matches. The risk stage reads the state in its batch and sets
``risk.signals.friction_active``, so the friction stage only pays a round trip for accounts that
have state. Expiry is the store's TTL.

Reversal: an operator lists and clears it (admin API below, ``gateway friction list|clear``).
A clear must say who clears (``by``) and may say why (``reason``); it is one store batch that
deletes the records and appends an event naming who, when, what (the records removed, with their
own why) to the account's friction history (``frh:{account}``, kept :data:`HISTORY_TTL`), so an
analyst can reconstruct why an account was challenged and when it was released. The admin call
also writes the event to the audit log (``"event": "friction_cleared"``) and the server log.
Applying is audited per request (``ctx.audit["friction"]``), clearing here: the history only
holds operator actions, so its size follows how often operators act, not traffic.

A clear does not exempt the account: if an enforced rule with a ``ttl`` still matches its next
request, the state is saved again (lower the risk, or change the policy, to release it for good).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.friction.model import FrictionAction
from gateway.risk.sigstore import Op, SignalStore, StateDelete, StateGet, StatePut
from gateway.store.base import StoreError

log = logging.getLogger(__name__)

REVERIFY_TTL = 30 * 86400.0
HISTORY_TTL = 180 * 86400.0  # operator actions on an account are kept this long after the latest
HISTORY_SHOWN = 100  # newest events returned by a listing
_ACCOUNT = re.compile(r"^[^\s/]{1,256}$")
_OPERATOR = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,127}$")  # printable ASCII, no leading space
MAX_REASON = 500
AdminRoute = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], bool]


def _new_event_id(now: float) -> str:
    """History field name: sorts by time; the random part keeps two replicas' events apart."""
    return f"{int(now * 1000):014d}-{os.urandom(4).hex()}"


class FrictionState:
    """One account's sticky friction (``fr:{account}``: rule id → record) and its history."""

    def __init__(self, store: SignalStore, clock: Callable[[], float] = time.time,
                 event_id: Callable[[float], str] = _new_event_id) -> None:
        self._store = store
        self._clock = clock
        self._event_id = event_id

    @staticmethod
    def _key(account: str) -> str:
        return f"fr:{account}"

    @staticmethod
    def _history_key(account: str) -> str:
        return f"frh:{account}"

    async def _raw(self, account: str) -> dict[str, str]:
        result = await self._store.batch([StateGet(self._key(account))])
        raw: dict[str, str] = result.results[0] or {}
        return raw

    @staticmethod
    def _parse(text: str) -> tuple[FrictionAction, dict[str, Any]] | None:
        try:
            record = json.loads(text)
            return FrictionAction.from_json(record["action"]), record
        except (ValueError, KeyError, TypeError):
            return None

    async def load(self, account: str) -> dict[str, tuple[FrictionAction, dict[str, Any]]]:
        """rule id → (action, stored record); unreadable records are skipped (listed apart)."""
        out: dict[str, tuple[FrictionAction, dict[str, Any]]] = {}
        for rule_id, text in (await self._raw(account)).items():
            parsed = self._parse(text)
            if parsed is not None:
                out[rule_id] = parsed
        return out

    async def save(self, account: str, rule_id: str, action: FrictionAction,
                   why: dict[str, Any] | None = None) -> dict[str, Any]:
        """Save ``action`` as sticky for the account; ``why`` (request id, risk figures) is kept in
        the record for the listing. Returns the record."""
        ttl = action.ttl or REVERIFY_TTL
        now = self._clock()
        record: dict[str, Any] = {"action": action.to_json(), "rule": rule_id, "since": round(now),
                                  "expires": round(now + ttl), **(why or {})}
        await self._store.batch([StatePut(self._key(account), rule_id, json.dumps(record), ttl)])
        return record

    async def clear(self, account: str, by: str, reason: str | None = None, rule: str | None = None,
                    reverify_only: bool = False) -> dict[str, Any]:
        """Remove the account's sticky friction (all of it, one ``rule``, or only pending
        reverification) and record who did it. Returns the history event, whose ``cleared`` maps
        each removed rule id to its record (the raw text if it was unreadable).

        Only records read here are deleted, so one saved concurrently is neither removed nor
        reported as removed: the event lists exactly what the clear took away."""
        raw = await self._raw(account)
        cleared: dict[str, Any] = {}
        for rule_id, text in raw.items():
            if rule is not None and rule_id != rule:
                continue
            parsed = self._parse(text)
            if reverify_only and (parsed is None or parsed[0].reverify is None):
                continue
            cleared[rule_id] = parsed[1] if parsed is not None else {"unreadable": text}
        now = self._clock()
        scope = "reverify" if reverify_only else "rule" if rule is not None else "all"
        event: dict[str, Any] = {"event": "friction_cleared", "ts": round(now, 3), "account": account,
                                 "by": by, "reason": reason, "scope": scope, "cleared": cleared}
        if rule is not None:
            event["rule"] = rule
        ops: list[Op] = [StateDelete(self._key(account), rule_id) for rule_id in cleared]
        ops.append(StatePut(self._history_key(account), self._event_id(now), json.dumps(event), HISTORY_TTL))
        await self._store.batch(ops)
        return event

    async def history(self, account: str, limit: int = HISTORY_SHOWN) -> list[dict[str, Any]]:
        """The account's recorded operator actions, newest first."""
        result = await self._store.batch([StateGet(self._history_key(account))])
        raw: dict[str, str] = result.results[0] or {}
        events: list[dict[str, Any]] = []
        for event_id in sorted(raw, reverse=True)[:limit]:
            try:
                events.append({"id": event_id, **json.loads(raw[event_id])})
            except (ValueError, TypeError):
                events.append({"id": event_id, "unreadable": raw[event_id]})
        return events

    async def listing(self, account: str) -> dict[str, Any]:
        """What the admin listing shows: saved friction (rule id → record, with why and expiry),
        records this version cannot read, and the history of operator actions."""
        friction: dict[str, Any] = {}
        unreadable: dict[str, str] = {}
        for rule_id, text in (await self._raw(account)).items():
            parsed = self._parse(text)
            if parsed is None:
                unreadable[rule_id] = text
            else:
                friction[rule_id] = parsed[1]
        out: dict[str, Any] = {"account": account, "friction": friction}
        if unreadable:
            out["unreadable"] = unreadable
        out["history"] = await self.history(account)
        return out


def _account(request: web.Request) -> str:
    account = request.match_info.get("account", "")
    if not _ACCOUNT.match(account):
        raise web.HTTPBadRequest(text="invalid account")
    return account


def _operator(request: web.Request) -> tuple[str, str | None]:
    """Who clears (``?by=`` or ``X-Tollgate-Operator``; required: the admin token is shared, so
    it cannot say who) and why (``?reason=`` or ``X-Tollgate-Reason``)."""
    by = request.query.get("by") or request.headers.get("X-Tollgate-Operator") or ""
    if not _OPERATOR.match(by):
        raise web.HTTPBadRequest(text="say who clears: ?by=NAME (or X-Tollgate-Operator), "
                                      "1-128 printable ASCII characters")
    reason = request.query.get("reason") or request.headers.get("X-Tollgate-Reason") or None
    if reason is not None and len(reason) > MAX_REASON:
        raise web.HTTPBadRequest(text=f"reason: at most {MAX_REASON} characters")
    return by, reason


def _publish(request: web.Request, event: dict[str, Any]) -> None:
    """The clear, beside the request records in the audit log (when one is configured) and in
    the server log."""
    from gateway.app import RUNTIME
    from gateway.audit import utc_millis
    from gateway.pipeline import peer_address

    peer = peer_address(request)
    record = {**event, "ts": utc_millis(event["ts"]), "peer": str(peer) if peer else None}
    log.info("friction cleared for account %r by %r (%s): %s", event["account"], event["by"],
             event["reason"] or "no reason given", ", ".join(event["cleared"]) or "nothing to clear")
    runtime = request.app.get(RUNTIME)
    sink = runtime.features.audit_sink if runtime is not None else None
    if sink is not None:
        sink.emit(record)


def _unavailable(exc: StoreError) -> web.Response:
    return web.json_response({"error": f"friction state store unavailable: {exc}"}, status=503)


def friction_admin_routes(state: FrictionState, prefix: str = "/admin/friction") -> list[AdminRoute]:
    """``(method, path, handler, mutating)`` for ``Features.admin_routes`` (all need the admin
    token: friction state reveals who is being watched):

    * ``GET {prefix}/{account}``: saved friction (rule id → action, since, expiry, request id and
      risk that saved it) and the history of clears;
    * ``DELETE {prefix}/{account}?by=NAME[&reason=TEXT][&rule=ID]``: clear all of it, or one rule;
    * ``DELETE {prefix}/{account}/reverify?by=NAME[&reason=TEXT]``: clear pending reverification.

    A clear answers ``{"account", "cleared": [rule ids], "event": {...}}``.
    """

    async def list_friction(request: web.Request) -> web.Response:
        account = _account(request)
        try:
            return web.json_response(await state.listing(account))
        except StoreError as exc:
            return _unavailable(exc)

    async def clear(request: web.Request, reverify_only: bool) -> web.Response:
        account = _account(request)
        by, reason = _operator(request)
        rule = None if reverify_only else request.query.get("rule") or None
        try:
            event = await state.clear(account, by, reason, rule=rule, reverify_only=reverify_only)
        except StoreError as exc:
            return _unavailable(exc)  # nothing is known to be cleared: the caller retries
        _publish(request, event)
        return web.json_response({"account": account, "cleared": sorted(event["cleared"]), "event": event})

    async def clear_friction(request: web.Request) -> web.Response:
        return await clear(request, reverify_only=False)

    async def clear_reverify(request: web.Request) -> web.Response:
        return await clear(request, reverify_only=True)

    return [
        ("GET", f"{prefix}/{{account}}", list_friction, True),
        ("DELETE", f"{prefix}/{{account}}", clear_friction, True),
        ("DELETE", f"{prefix}/{{account}}/reverify", clear_reverify, True),
    ]
