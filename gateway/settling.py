"""Stages that must be told when a response is over (to reconcile reservations or release leases).

The pipeline calls ``settle_now`` after every response: what needs no I/O is done at once, and
only a store call that must be awaited comes back, so most requests settle without the task that
protecting an await from cancellation costs.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable

from gateway.context import RequestContext


@runtime_checkable
class Settling(Protocol):
    def settle_now(self, ctx: RequestContext) -> Awaitable[None] | None: ...


class SettlesNow:
    """``await stage.settle(ctx)``: the whole settle, for callers outside the pipeline."""

    def settle_now(self, ctx: RequestContext) -> Awaitable[None] | None:
        raise NotImplementedError

    async def settle(self, ctx: RequestContext) -> None:
        rest = self.settle_now(ctx)
        if rest is not None:
            await rest
