"""Interop with MaxMind's official test databases (../shared/geoip), skipped when absent.

Known answers are from that folder's README. Addresses go through *our* normalisation first,
as they do in the gateway. Note the Teredo case: MaxMind's tree aliases 2001::/32 by the
*server* field (bits 32-63), so the raw reader answers US for 2001:0:d8a0:5338::; the gateway
normalises Teredo to the *client* address (RFC 4380: the bit-inverted low 32 bits), which for
that address is 255.255.255.255 and unknown. A Teredo address whose client is 216.160.83.56
resolves to US.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import geoip2.database
import geoip2.errors
import pytest

from gateway.geo.config import GeoIpConfig
from gateway.geo.maxmind import MaxMindGeoProvider
from gateway.ipaddr import normalize

SHARED = Path(__file__).resolve().parents[3].parent / "shared" / "geoip"
pytestmark = pytest.mark.skipif(not (SHARED / "GeoIP2-Country-Test.mmdb").exists(),
                                reason="MaxMind test databases not present in ../shared/geoip")
ip = ipaddress.ip_address


async def provider(**paths: str) -> MaxMindGeoProvider:
    config = GeoIpConfig(**{k: SHARED / v for k, v in paths.items()}, reload_interval=0)  # type: ignore[arg-type]
    geo = MaxMindGeoProvider(config)
    await geo.start()
    return geo


COUNTRY_ANSWERS = [
    ("2001:250::1", "CN"), ("111.235.160.1", "CN"), ("2001:2e0::1", "HK"), ("2a02:d0c0::1", "RU"),
    ("2a02:d2c0::1", "IR"), ("216.160.83.56", "US"), ("::ffff:216.160.83.56", "US"),
    ("2002:d8a0:5338::1", "US"),
    ("2001:0:4136:e378:8000:63bf:275f:acc7", "US"),  # Teredo whose client is 216.160.83.56
    ("81.2.69.160", "GB"), ("2.125.160.216", "GB"), ("89.160.20.112", "SE"), ("2001:218::1", "JP"),
]


@pytest.mark.parametrize("db", ["GeoIP2-Country-Test.mmdb", "GeoLite2-Country-Test.mmdb"])
@pytest.mark.parametrize("address, country", COUNTRY_ANSWERS)
async def test_country_known_answers(db: str, address: str, country: str) -> None:
    geo = await provider(country_db=db)
    try:
        assert geo.lookup(normalize(ip(address))).country == country
    finally:
        await geo.close()


async def test_teredo_shaped_address_uses_client_not_server_field() -> None:
    address = ip("2001:0:d8a0:5338::")
    with geoip2.database.Reader(str(SHARED / "GeoIP2-Country-Test.mmdb")) as raw:
        assert raw.country(address).country.iso_code == "US"  # MaxMind's alias: server field
    assert normalize(address) == ip("255.255.255.255")
    geo = await provider(country_db="GeoIP2-Country-Test.mmdb")
    try:
        assert geo.lookup(normalize(address)).country is None
    finally:
        await geo.close()


@pytest.mark.parametrize("db", ["GeoIP2-Country-Test.mmdb", "GeoLite2-Country-Test.mmdb"])
async def test_ipv4_compatible_addresses_read_as_maxmind_reads_them(db: str) -> None:
    """MaxMind keeps IPv4 under ::/96, so its own reader answers ::a.b.c.d as a.b.c.d: normalising
    it to a.b.c.d makes a policy CIDR agree with the country. ::/104 (::, ::1, ::0.x.x.x) has no
    data in MaxMind's tree, so keeping those as IPv6 loses no answer."""
    with geoip2.database.Reader(str(SHARED / db)) as raw:
        assert raw.country(ip("::216.160.83.56")).country.iso_code == "US"
        assert raw.country(ip("216.160.83.56")).country.iso_code == "US"
        for address in ("::1", "::", "::0.0.0.5", "::0.255.255.255"):
            with pytest.raises(geoip2.errors.AddressNotFoundError):
                raw.country(ip(address))
    assert normalize(ip("::216.160.83.56")) == ip("216.160.83.56")
    assert normalize(ip("::0.0.0.5")) == ip("::5")
    geo = await provider(country_db=db)
    try:
        assert geo.lookup(normalize(ip("::216.160.83.56"))).country == "US"
        assert geo.lookup(normalize(ip("::1"))).country is None
    finally:
        await geo.close()


@pytest.mark.parametrize("db", ["GeoIP2-City-Test.mmdb", "GeoIP2-Enterprise-Test.mmdb"])
async def test_city_and_enterprise_as_country_db(db: str) -> None:
    geo = await provider(country_db=db)
    try:
        assert geo.lookup(ip("81.2.69.160")).country == "GB"
        assert geo.lookup(normalize(ip("::ffff:216.160.83.56"))).country == "US"
        info = geo.databases()[0]
        assert info.database_type in ("GeoIP2-City", "GeoIP2-Enterprise") and info.build_epoch
    finally:
        await geo.close()


async def test_asn_known_answers() -> None:
    geo = await provider(asn_db="GeoLite2-ASN-Test.mmdb")
    try:
        assert (geo.lookup(ip("1.0.0.1")).asn, geo.lookup(ip("1.0.0.1")).as_org) == (15169, "Google Inc.")
        rec = geo.lookup(ip("12.81.92.1"))
        assert (rec.asn, rec.as_org) == (7018, "AT&T Services")
        assert geo.lookup(ip("1.0.0.1")).country is None  # no country database configured
    finally:
        await geo.close()


async def test_anonymous_ip_known_answers() -> None:
    geo = await provider(anonymous_db="GeoIP2-Anonymous-IP-Test.mmdb")
    try:
        every = geo.lookup(ip("81.2.69.1"))
        assert all((every.is_anonymous, every.is_anonymous_vpn, every.is_hosting_provider,
                    every.is_tor_exit_node, every.is_public_proxy, every.is_residential_proxy))
        vpn = geo.lookup(ip("1.2.0.1"))
        assert vpn.is_anonymous_vpn and not vpn.is_tor_exit_node
    finally:
        await geo.close()


async def test_all_three_together_with_build_dates() -> None:
    geo = await provider(country_db="GeoIP2-Country-Test.mmdb", asn_db="GeoLite2-ASN-Test.mmdb",
                         anonymous_db="GeoIP2-Anonymous-IP-Test.mmdb")
    try:
        rec = geo.lookup(ip("81.2.69.160"))
        assert rec.country == "GB" and rec.registered_country
        types = {i.role: i.database_type for i in geo.databases()}
        assert types == {"country": "GeoIP2-Country", "asn": "GeoLite2-ASN",
                         "anonymous": "GeoIP2-Anonymous-IP"}
        assert all(i.build_epoch and i.build_epoch > 1_400_000_000 for i in geo.databases())
    finally:
        await geo.close()
