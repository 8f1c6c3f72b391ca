"""Geo: country, ASN and anonymiser flags of ``ctx.client.ip`` from the GeoProvider."""

from __future__ import annotations

from gateway.context import Decision, RequestContext
from gateway.geo.base import GeoProvider


class GeoStage:
    """Fills ``ctx.client.country`` & co. Never short-circuits: an address no database knows
    leaves ``country`` as None and the policy decides what unknown means."""

    before_body = True  # reads headers only (see Pipeline)

    def __init__(self, provider: GeoProvider) -> None:
        self._provider = provider

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        ip = ctx.client.ip
        if ip is not None:
            self._provider.lookup(ip).apply(ctx.client)
        return None
