"""MaxMindGeoProvider against MMDB fixtures generated here: lookups, types, cache, hot reload."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from gateway.geo.base import EMPTY_RECORD, GeoRecord
from gateway.geo.config import GeoIpConfig
from gateway.geo.maxmind import GeoDatabaseError, MaxMindGeoProvider
from gateway.ipaddr import normalize
from tests.support.mmdb import (
    ASN_TYPE,
    CITY_TYPE,
    write_anonymous_db,
    write_asn_db,
    write_country_db,
)

ip = ipaddress.ip_address


@pytest.fixture
def dbs(tmp_path: Path) -> GeoIpConfig:
    country = write_country_db(tmp_path / "country.mmdb", {
        "1.0.0.0/24": "CN", "5.0.0.0/8": ("DE", "US"), "2001:db8::/32": "RU", "198.51.100.0/24": "US",
    }, build_epoch=1_700_000_000)
    asn = write_asn_db(tmp_path / "asn.mmdb", {"1.0.0.0/24": (4134, "Chinanet")}, build_epoch=1_700_000_100)
    anon = write_anonymous_db(tmp_path / "anon.mmdb", {
        "198.51.100.0/25": {"is_anonymous_vpn"}, "198.51.100.128/26": {"is_tor_exit_node"},
        "198.51.100.192/26": {"is_hosting_provider", "is_public_proxy", "is_residential_proxy"},
    }, build_epoch=1_700_000_200)
    return GeoIpConfig(country_db=country, asn_db=asn, anonymous_db=anon, reload_interval=0)


async def started(config: GeoIpConfig) -> MaxMindGeoProvider:
    provider = MaxMindGeoProvider(config)
    await provider.start()
    return provider


async def test_lookup_combines_databases(dbs: GeoIpConfig) -> None:
    geo = await started(dbs)
    try:
        rec = geo.lookup(ip("1.0.0.7"))
        assert (rec.country, rec.registered_country, rec.asn, rec.as_org) == ("CN", "CN", 4134, "Chinanet")
        assert not rec.is_anonymous
        assert geo.lookup(ip("5.6.7.8")) == GeoRecord(country="DE", registered_country="US")
        assert geo.lookup(ip("2001:db8::42")).country == "RU"
        vpn = geo.lookup(ip("198.51.100.3"))
        assert vpn.country == "US" and vpn.is_anonymous and vpn.is_anonymous_vpn and not vpn.is_tor_exit_node
        assert geo.lookup(ip("198.51.100.130")).is_tor_exit_node
        hosting = geo.lookup(ip("198.51.100.200"))
        assert hosting.is_hosting_provider and hosting.is_public_proxy and hosting.is_residential_proxy
    finally:
        await geo.close()


async def test_unknown_address_yields_empty_record(dbs: GeoIpConfig) -> None:
    geo = await started(dbs)
    try:
        assert geo.lookup(ip("203.0.113.1")) is EMPTY_RECORD
        assert geo.lookup(ip("2001:4860::1")).country is None
        assert geo.lookup(ip("::1")) is EMPTY_RECORD
    finally:
        await geo.close()


async def test_normalised_forms_resolve_like_ipv4(dbs: GeoIpConfig) -> None:
    geo = await started(dbs)
    try:
        # mmdb-writer trees have no IPv4-mapped/6to4/Teredo aliases: only normalisation helps.
        for form in ("::ffff:1.0.0.9", "2002:0100:0009::1", "2001:0:5ef5:79fd:0:0:feff:fff6"):
            assert geo.lookup(normalize(ip(form))).country == "CN", form
    finally:
        await geo.close()


async def test_database_info_exposes_type_and_build_date(dbs: GeoIpConfig) -> None:
    geo = await started(dbs)
    try:
        infos = {i.role: i for i in geo.databases()}
        assert infos["country"].database_type == "GeoIP2-Country"
        assert infos["country"].build_epoch == 1_700_000_000
        assert infos["asn"].database_type == ASN_TYPE and infos["asn"].build_epoch == 1_700_000_100
        assert infos["anonymous"].build_epoch == 1_700_000_200
        assert infos["country"].loaded_at is not None and infos["country"].reloads == 0
    finally:
        await geo.close()


async def test_city_database_is_accepted_as_country_db(tmp_path: Path) -> None:
    city = write_country_db(tmp_path / "city.mmdb", {"1.0.0.0/24": "CN"}, database_type=CITY_TYPE)
    geo = await started(GeoIpConfig(country_db=city, reload_interval=0))
    try:
        assert geo.lookup(ip("1.0.0.1")).country == "CN"
    finally:
        await geo.close()


async def test_wrong_database_type_for_role_fails_at_start(tmp_path: Path) -> None:
    asn = write_asn_db(tmp_path / "asn.mmdb", {"1.0.0.0/24": (1, "x")})
    with pytest.raises(GeoDatabaseError, match="type 'GeoLite2-ASN' cannot be used as country_db"):
        await started(GeoIpConfig(country_db=asn, reload_interval=0))


async def test_missing_or_corrupt_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(GeoDatabaseError, match="cannot open"):
        await started(GeoIpConfig(country_db=tmp_path / "nope.mmdb", reload_interval=0))
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"not an mmdb" * 100)
    with pytest.raises(GeoDatabaseError, match="cannot open"):
        await started(GeoIpConfig(country_db=bad, reload_interval=0))


async def test_cache_is_bounded_and_serves_repeats(dbs: GeoIpConfig) -> None:
    geo = await started(GeoIpConfig(dbs.country_db, cache_size=2, reload_interval=0))
    try:
        first = geo.lookup(ip("1.0.0.1"))
        assert geo.lookup(ip("1.0.0.1")) is first
        geo.lookup(ip("1.0.0.2"))
        geo.lookup(ip("1.0.0.3"))
        assert len(geo._state.cache) == 2
    finally:
        await geo.close()


async def test_reload_swaps_database_and_drops_cache(dbs: GeoIpConfig) -> None:
    geo = await started(dbs)
    try:
        assert geo.lookup(ip("1.0.0.1")).country == "CN"
        assert dbs.country_db is not None
        write_country_db(dbs.country_db, {"1.0.0.0/24": "JP"}, build_epoch=1_800_000_000)
        await geo.reload()
        assert geo.lookup(ip("1.0.0.1")).country == "JP"
        info = {i.role: i for i in geo.databases()}["country"]
        assert info.build_epoch == 1_800_000_000 and info.reloads == 1
        assert {i.role: i for i in geo.databases()}["asn"].reloads == 0  # unchanged file untouched
    finally:
        await geo.close()


async def test_broken_replacement_keeps_last_good(dbs: GeoIpConfig) -> None:
    geo = await started(dbs)
    try:
        assert dbs.country_db is not None
        tmp = dbs.country_db.with_name("incoming")
        tmp.write_bytes(b"\x00" * 4096)
        tmp.replace(dbs.country_db)
        await geo.reload()
        assert geo.lookup(ip("1.0.0.1")).country == "CN"
        info = {i.role: i for i in geo.databases()}["country"]
        assert info.reload_errors == 1 and info.last_error and "cannot open" in info.last_error
    finally:
        await geo.close()


async def test_watcher_picks_up_atomic_rename(dbs: GeoIpConfig) -> None:
    config = GeoIpConfig(dbs.country_db, dbs.asn_db, dbs.anonymous_db, reload_interval=0.02)
    geo = await started(config)
    try:
        assert config.country_db is not None
        write_country_db(config.country_db, {"1.0.0.0/24": "KR"})  # temp file + os.replace
        for _ in range(250):  # real file watching: poll until the swap lands (≤ 5 s)
            if geo.lookup(ip("1.0.0.1")).country == "KR":
                break
            await asyncio.sleep(0.02)
        assert geo.lookup(ip("1.0.0.1")).country == "KR"
    finally:
        await geo.close()
