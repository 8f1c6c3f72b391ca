"""Shared parts of the quota stage tests (tests/unit/quota): the settings of the ``stage``
fixture, for tests that build a stage of their own on another store, and a store that is down."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.quota.settings import Price, QuotaSettings
from gateway.store.base import Charge, ChargeResult, StoreError
from gateway.store.memory import MemoryStore

SETTINGS = QuotaSettings(default_output_tokens=1000, prices=(("gpt-4o", Price(2.5, 10.0)),))


class DownStore(MemoryStore):
    """A shared store that does not answer: every charge raises :class:`StoreError`, so the
    stage's failure modes (open, closed, local) decide."""

    async def charge(self, charges: Sequence[Charge]) -> ChargeResult:
        raise StoreError("down")
