"""The policy stage: evaluate the request against the current policy snapshot."""

from __future__ import annotations

from typing import Protocol

from gateway.context import Decision, RequestContext
from gateway.policy.evaluate import Snapshot, evaluate


class SnapshotSource(Protocol):
    """Anything with a ``current`` snapshot (a :class:`~gateway.policy.reload.PolicyHolder`)."""

    @property
    def current(self) -> Snapshot: ...


class MatchStage:
    """Sets ``ctx.outcome`` and ``ctx.policy_revision``; returns the deny Decision, if any.

    The snapshot is read once, here, and evaluation is synchronous, so a reload in the middle of
    a request cannot mix two policy revisions: later stages read only ``ctx.outcome``.
    """

    def __init__(self, holder: SnapshotSource) -> None:
        self._holder = holder

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        snapshot = self._holder.current
        outcome = evaluate(snapshot, ctx)
        ctx.outcome = outcome
        ctx.policy_revision = snapshot.revision
        return outcome.deny
