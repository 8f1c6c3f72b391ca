"""Build the configured store (the app calls this once at start-up)."""

from __future__ import annotations

import time

from gateway.quota.settings import QuotaSettings
from gateway.store.base import Clock, Store
from gateway.store.memory import MemoryStore


def create_store(settings: QuotaSettings, clock: Clock = time.time) -> Store:
    """``MemoryStore`` or ``RedisStore`` (single or Cluster) from the ``store:`` settings."""
    if settings.backend == "redis":
        from gateway.store.redis import RedisStore  # only import redis-py when configured

        return RedisStore.from_url(settings.redis_urls, cluster=settings.redis_cluster,
                                   prefix=settings.key_prefix, deadline=settings.deadline)
    return MemoryStore(clock)
