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


def consumed_usage(ctx: RequestContext, input_reserved: int) -> tuple[int, int]:
    """The (input, output) tokens a request consumed, which every reservation (quotas,
    ``cap_tokens``) settles to. What the upstream reported when it reported usage. Otherwise
    nothing when the model was never reached or refused (not forwarded; an upstream error status)
    or when the gateway knows nothing was consumed (``ctx.nothing_consumed``: never written
    upstream, or abandoned at shutdown with a "retry" answer). Otherwise the
    input is assumed consumed as estimated, and output is what was produced, so a stream cut short
    pays for the part that was streamed."""
    usage = ctx.usage
    if not ctx.request.billed:  # count_tokens, models: no model ran, whatever the reply says
        return 0, 0
    if not (usage.complete or usage.input_tokens > 0 or usage.output_tokens > 0):
        failed = ctx.upstream_status is not None and ctx.upstream_status >= 400
        if ctx.upstream_started is None or failed or ctx.nothing_consumed:
            return 0, 0
    input_tokens = usage.input_tokens if usage.complete or usage.input_tokens else input_reserved
    return input_tokens, usage.output_tokens


class SettlesNow:
    """``await stage.settle(ctx)``: the whole settle, for callers outside the pipeline."""

    def settle_now(self, ctx: RequestContext) -> Awaitable[None] | None:
        raise NotImplementedError

    async def settle(self, ctx: RequestContext) -> None:
        rest = self.settle_now(ctx)
        if rest is not None:
            await rest
