"""Fixtures of the quota tests: a quota stage on an in-memory store and a hand-driven clock."""

from __future__ import annotations

import pytest

from gateway.quota.stage import QuotaStage
from gateway.store.memory import MemoryStore
from tests.support.clock import FakeClock
from tests.support.quota_stage import SETTINGS


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def stage(clock: FakeClock) -> QuotaStage:
    return QuotaStage(MemoryStore(clock), SETTINGS, clock)
