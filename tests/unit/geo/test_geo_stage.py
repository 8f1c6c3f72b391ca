"""GeoStage with the StaticGeoProvider, and the ``geoip:`` config parser."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.geo.base import EMPTY_RECORD, GeoProvider, GeoRecord
from gateway.geo.config import parse_geoip_config
from gateway.geo.maxmind import MaxMindGeoProvider
from gateway.geo.static import StaticGeoProvider
from gateway.stages.geo import GeoStage
from gateway.yamlsource import ConfigError, Issues, Node

ip = ipaddress.ip_address
TABLE = {
    "1.0.0.0/8": GeoRecord(country="CN", registered_country="CN", asn=4134, as_org="Chinanet"),
    "1.2.3.0/24": GeoRecord(country="HK", is_anonymous=True, is_anonymous_vpn=True),
    "2001:db8::/32": GeoRecord(country="RU"),
}


def ctx_for(address: str | None) -> RequestContext:
    view = RequestView(api=ApiFamily.OPENAI, route="r", path="/", method="POST", headers={})
    ctx = RequestContext(request_id="r", request=view)
    ctx.client.ip = ip(address) if address else None
    return ctx


def test_static_longest_prefix_wins() -> None:
    geo = StaticGeoProvider(TABLE)
    assert geo.lookup(ip("1.9.9.9")).country == "CN"
    assert geo.lookup(ip("1.2.3.4")).country == "HK"
    assert geo.lookup(ip("2001:db8::1")).country == "RU"
    assert geo.lookup(ip("8.8.8.8")) is EMPTY_RECORD


def test_providers_satisfy_the_protocol() -> None:
    static: GeoProvider = StaticGeoProvider({})
    maxmind: GeoProvider = MaxMindGeoProvider(parse_geoip_config(None))
    assert static.databases() and maxmind.databases() == ()


async def test_stage_fills_client_fields() -> None:
    stage = GeoStage(StaticGeoProvider(TABLE))
    ctx = ctx_for("1.2.3.4")
    assert await stage(ctx) is None
    c = ctx.client
    assert (c.country, c.is_anonymous, c.is_anonymous_vpn, c.asn) == ("HK", True, True, None)
    ctx = ctx_for("1.0.0.1")
    await stage(ctx)
    assert (ctx.client.country, ctx.client.registered_country, ctx.client.asn, ctx.client.as_org) == (
        "CN", "CN", 4134, "Chinanet")


@pytest.mark.parametrize("address", ["8.8.8.8", None])
async def test_unknown_or_missing_address_leaves_country_null(address: str | None) -> None:
    ctx = ctx_for(address)
    assert await GeoStage(StaticGeoProvider(TABLE))(ctx) is None
    assert ctx.client.country is None and ctx.client.asn is None and not ctx.client.is_anonymous


def parse(text: str, base: Path | None = None) -> tuple[object, Issues]:
    issues = Issues()
    root = Node.parse(text, "gw.yaml", issues)
    assert root is not None
    return parse_geoip_config(root.child("geoip"), base), issues


def test_config_parses_and_resolves_relative_paths(tmp_path: Path) -> None:
    cfg, issues = parse("geoip:\n  country_db: dbs/Country.mmdb\n  asn_db: /abs/ASN.mmdb\n"
                        "  cache_size: 1000\n  reload_interval: 5m\n", tmp_path)
    issues.raise_if_errors()
    assert cfg.country_db == tmp_path / "dbs/Country.mmdb" and cfg.asn_db == Path("/abs/ASN.mmdb")  # type: ignore[attr-defined]
    assert cfg.anonymous_db is None and cfg.cache_size == 1000 and cfg.reload_interval == 300  # type: ignore[attr-defined]
    assert cfg.enabled  # type: ignore[attr-defined]


def test_config_absent_means_disabled() -> None:
    cfg, issues = parse("other: 1\n")
    assert not cfg.enabled and not issues.items  # type: ignore[attr-defined]


def test_config_errors_are_positioned() -> None:
    _, issues = parse("geoip:\n  country_db: 42\n  cache_size: -1\n  reload_interval: soon\n  asn: x\n")
    with pytest.raises(ConfigError) as err:
        issues.raise_if_errors()
    text = str(err.value)
    assert "gw.yaml:2:15: geoip.country_db: expected a file path, got int 42" in text
    assert "geoip.cache_size: expected an integer from 0 (no cache) to 10000000" in text
    assert "gw.yaml:4:20: geoip.reload_interval: expected a duration" in text
    assert "unknown key 'asn'; did you mean 'asn_db'?" in text
