"""The GeoIP lookup and a policy CIDR must agree on the client's address, whatever IPv6 form of
an IPv4 address it arrives in: the client_ip, geo and match stages in a row, over a real MMDB
written with mmdb-writer (IPv4 under ::/96, as MaxMind ships it)."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.geo.config import GeoIpConfig
from gateway.geo.maxmind import MaxMindGeoProvider
from gateway.policy.compile import Source, compile_sources
from gateway.policy.evaluate import Snapshot
from gateway.settings import Settings, parse_settings
from gateway.stages.client_ip import ClientIpConfig, ClientIpStage
from gateway.stages.geo import GeoStage
from gateway.stages.match import MatchStage
from tests.support.mmdb import write_country_db

REGION_POLICY = """version: 1
rules:
  - {id: embargoed-net, when: {field: client.ip, cidr: 203.0.113.0/24}, deny: true}
  - {id: embargoed-country, when: {field: client.country, equals: KP}, deny: true}
"""


@dataclass(frozen=True, slots=True)
class Holder:
    current: Snapshot


@pytest.fixture
async def geo(tmp_path: Path) -> AsyncIterator[MaxMindGeoProvider]:
    db = write_country_db(tmp_path / "country.mmdb", {"203.0.113.0/24": "KP", "2001:db8::/32": "SE"})
    provider = MaxMindGeoProvider(GeoIpConfig(country_db=db, reload_interval=0))
    await provider.start()
    yield provider
    await provider.close()


def settings_with(extra: str) -> Settings:
    return parse_settings("mock_upstream: {enabled: true}\n" + extra, "gw.yaml")


async def decide(settings: Settings, geo: MaxMindGeoProvider, peer: str) -> RequestContext:
    snapshot, issues = compile_sources([Source("region.yaml", REGION_POLICY)], settings=settings)
    assert snapshot is not None, [str(i) for i in issues]
    client_ip = settings.sections.get("client_ip") or ClientIpConfig()
    stages = (ClientIpStage.from_config(client_ip), GeoStage(geo), MatchStage(Holder(snapshot)))
    view = RequestView(api=ApiFamily.OPENAI, route="chat.completions", path="/v1/chat/completions",
                       method="POST", headers=CIMultiDictProxy(CIMultiDict()))
    ctx = RequestContext(request_id="r", request=view)
    ctx.client.peer_ip = ipaddress.ip_address(peer)
    for stage in stages:
        if await stage(ctx) is not None:
            break
    return ctx


@pytest.mark.parametrize("peer", [
    "203.0.113.7",
    "::ffff:203.0.113.7",  # IPv4-mapped
    "::203.0.113.7",  # IPv4-compatible: MaxMind alone would answer it as 203.0.113.7 too
    "64:ff9b::203.0.113.7",  # NAT64 well-known prefix
    "2002:cb00:7107::1",  # 6to4
    "64:ff9b:1:cb00:71:700::",  # local NAT64 /48, listed in client_ip.nat64_prefixes
])
async def test_country_and_cidr_agree_for_every_form(geo: MaxMindGeoProvider, peer: str) -> None:
    ctx = await decide(settings_with("client_ip: {nat64_prefixes: [64:ff9b:1::/48]}\n"), geo, peer)
    assert str(ctx.client.ip) == "203.0.113.7"
    assert ctx.client.country == "KP"
    # the CIDR rule, first, decides: the country would have too
    assert ctx.outcome is not None and ctx.outcome.decision == "deny"
    assert ctx.outcome.matched == ["embargoed-net"]


async def test_unlisted_local_nat64_prefix_is_an_ipv6_client_to_both(geo: MaxMindGeoProvider) -> None:
    """Not configured: 64:ff9b:1::/48 may hold real IPv6 clients, so neither side decodes it."""
    ctx = await decide(settings_with(""), geo, "64:ff9b:1:cb00:71:700::")
    assert str(ctx.client.ip) == "64:ff9b:1:cb00:71:700::"
    assert ctx.client.country is None
    assert ctx.outcome is not None and ctx.outcome.matched == []


async def test_loopback_stays_ipv6_and_unknown(geo: MaxMindGeoProvider) -> None:
    ctx = await decide(settings_with(""), geo, "::1")
    assert str(ctx.client.ip) == "::1" and ctx.client.country is None
