"""Sticky friction state per account (in the signal store, with TTL) and its admin handlers.

A friction action with a ``ttl`` (and every ``reverify`` challenge, default 30 days) is saved
under the account when first applied; while saved it applies to every request of the account,
whether or not the rule still matches. The risk stage reads the state in its batch and sets
``risk.signals.friction_active``, so the friction stage only pays a round trip for accounts that
have state. Admin calls list and clear it; expiry is the store's TTL.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.friction.model import FrictionAction
from gateway.risk.sigstore import SignalStore, StateDelete, StateGet, StatePut

REVERIFY_TTL = 30 * 86400.0
_ACCOUNT = re.compile(r"^[^\s/]{1,256}$")
AdminRoute = tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], bool]


class FrictionState:
    def __init__(self, store: SignalStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    @staticmethod
    def _key(account: str) -> str:
        return f"fr:{account}"

    async def load(self, account: str) -> dict[str, tuple[FrictionAction, dict[str, Any]]]:
        """rule id → (action, stored record); unreadable records are skipped."""
        result = await self._store.batch([StateGet(self._key(account))])
        raw: dict[str, str] = result.results[0] or {}
        out: dict[str, tuple[FrictionAction, dict[str, Any]]] = {}
        for rule_id, text in raw.items():
            try:
                record = json.loads(text)
                out[rule_id] = (FrictionAction.from_json(record["action"]), record)
            except (ValueError, KeyError, TypeError):
                continue
        return out

    async def save(self, account: str, rule_id: str, action: FrictionAction) -> float:
        ttl = action.ttl or REVERIFY_TTL
        record = {"action": action.to_json(), "rule": rule_id, "expires": round(self._clock() + ttl)}
        await self._store.batch([StatePut(self._key(account), rule_id, json.dumps(record), ttl)])
        return ttl

    async def clear(self, account: str, rule_id: str | None = None) -> None:
        await self._store.batch([StateDelete(self._key(account), rule_id)])

    async def clear_reverify(self, account: str) -> list[str]:
        """Remove every saved reverify challenge of the account; returns the rule ids cleared."""
        saved = await self.load(account)
        found = [rid for rid, (action, _r) in saved.items() if action.reverify is not None]
        if found:
            await self._store.batch([StateDelete(self._key(account), rid) for rid in found])
        return found


def _account(request: web.Request) -> str:
    account = request.match_info.get("account", "")
    if not _ACCOUNT.match(account):
        raise web.HTTPBadRequest(text="invalid account")
    return account


def friction_admin_routes(state: FrictionState, prefix: str = "/admin/friction") -> list[AdminRoute]:
    """``(method, path, handler, mutating)`` for ``Features.admin_routes`` (all need the admin
    token: friction state reveals who is being watched):

    * ``GET {prefix}/{account}``: saved friction (rule id → action, expiry);
    * ``DELETE {prefix}/{account}``: clear all of it (``?rule=ID`` for one rule);
    * ``DELETE {prefix}/{account}/reverify``: clear pending reverification only.
    """

    async def list_friction(request: web.Request) -> web.Response:
        account = _account(request)
        saved = await state.load(account)
        records = {rid: rec for rid, (_a, rec) in saved.items()}
        return web.json_response({"account": account, "friction": records})

    async def clear_friction(request: web.Request) -> web.Response:
        account = _account(request)
        rule = request.query.get("rule")
        await state.clear(account, rule)
        return web.json_response({"account": account, "cleared": rule or "all"})

    async def clear_reverify(request: web.Request) -> web.Response:
        account = _account(request)
        return web.json_response({"account": account, "cleared": await state.clear_reverify(account)})

    return [
        ("GET", f"{prefix}/{{account}}", list_friction, True),
        ("DELETE", f"{prefix}/{{account}}", clear_friction, True),
        ("DELETE", f"{prefix}/{{account}}/reverify", clear_reverify, True),
    ]
