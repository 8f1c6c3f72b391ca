"""Damaged MMDB files: refused at load and reload (the previous database keeps serving); lookups
that fail on a database damaged under us are counted, logged at most once a minute, shown in the
status and metrics and reported as failing (readiness)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import geoip2.database
import maxminddb
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.component_metrics import ComponentCollector
from gateway.geo import maxmind
from gateway.geo.base import lookups_failing
from gateway.geo.config import GeoIpConfig
from gateway.geo.maxmind import LOOKUP_ERROR_WINDOW, GeoDatabaseError, MaxMindGeoProvider, open_database
from gateway.geo.verify import DatabaseDamaged, verify_database
from tests.support.clock import FakeClock
from tests.support.mmdb import (
    COUNTRY_TYPE,
    country_record,
    write_anonymous_db,
    write_asn_db,
    write_country_db,
    write_mmdb,
)

ip = ipaddress.ip_address
CN, TOR = ip("1.0.0.7"), ip("198.51.100.130")


def data_section_start(path: Path) -> int:
    with maxminddb.open_database(str(path)) as reader:
        meta = reader.metadata()
        return meta.node_count * meta.record_size // 4 + 16  # the tree, then 16 zero bytes


def damaged_copy(path: Path, name: str, offset: int = 0) -> Path:
    """A copy of ``path`` with 8 bytes overwritten ``offset`` bytes into its data section."""
    data = bytearray(path.read_bytes())
    start = data_section_start(path) + offset
    data[start:start + 8] = b"\xff" * 8
    copy = path.with_name(name)
    copy.write_bytes(bytes(data))
    return copy


@pytest.fixture
def dbs(tmp_path: Path) -> GeoIpConfig:
    country = write_country_db(tmp_path / "country.mmdb", {"1.0.0.0/24": "CN", "5.0.0.0/8": "DE"})
    anon = write_anonymous_db(tmp_path / "anon.mmdb", {"198.51.100.128/26": {"is_tor_exit_node"}})
    return GeoIpConfig(country_db=country, anonymous_db=anon, reload_interval=0)


async def test_damaged_replacements_are_refused_and_the_loaded_ones_keep_serving(dbs: GeoIpConfig) -> None:
    geo = MaxMindGeoProvider(dbs)
    await geo.start()
    try:
        assert geo.lookup(CN).country == "CN" and geo.lookup(TOR).is_tor_exit_node
        assert dbs.country_db is not None and dbs.anonymous_db is not None
        for path in (dbs.country_db, dbs.anonymous_db):
            damaged_copy(path, f"{path.name}.incoming").replace(path)  # as geoipupdate would
        await geo.reload()
        geo._state.cache.clear()  # answers must come from the readers, not the cache
        assert geo.lookup(CN).country == "CN"
        assert geo.lookup(TOR).is_tor_exit_node
        infos = {i.role: i for i in geo.databases()}
        for role in ("country", "anonymous"):
            assert infos[role].reload_errors == 1 and infos[role].reloads == 0
            assert "damaged, refused" in (infos[role].last_error or "")
        assert geo.failing() == ()
    finally:
        await geo.close()


async def test_a_damaged_file_fails_at_start(tmp_path: Path) -> None:
    good = write_country_db(tmp_path / "good.mmdb", {"1.0.0.0/24": "CN"})
    bad = damaged_copy(good, "bad.mmdb")
    with pytest.raises(GeoDatabaseError, match="country database .*bad.mmdb: damaged, refused"):
        await MaxMindGeoProvider(GeoIpConfig(country_db=bad, reload_interval=0)).start()


def test_verify_reports_where_the_damage_is(tmp_path: Path) -> None:
    good = write_anonymous_db(tmp_path / "anon.mmdb", {"198.51.100.0/24": {"is_anonymous_vpn"}})

    def no_lookup(_: object) -> None:
        return None

    assert verify_database(good, no_lookup).describe() == "complete"
    # Damage no probe reaches is found by decoding the data section value by value.
    with pytest.raises(DatabaseDamaged, match="data section at byte 0"):
        verify_database(damaged_copy(good, "bad.mmdb"), no_lookup)
    data = bytearray(good.read_bytes())
    data[data_section_start(good) - 3] = 1  # in the separator between tree and data
    (tmp_path / "sep.mmdb").write_bytes(bytes(data))
    with pytest.raises(DatabaseDamaged, match="separator"):
        verify_database(tmp_path / "sep.mmdb", no_lookup)


def test_verify_stops_at_its_time_budget_and_says_so(tmp_path: Path) -> None:
    table = {f"10.{i // 256}.{i % 256}.0/24": (64_512 + i, f"org {i}") for i in range(1000)}
    many = write_asn_db(tmp_path / "asn.mmdb", table)
    clock = FakeClock()

    def ticking() -> float:  # each reading is a second later: the budget runs out at the first check
        clock.advance(1.0)
        return clock.now

    result = verify_database(many, lambda _: None, budget=0.5, clock=ticking)
    assert not result.complete and result.describe().startswith("partial: ")
    assert 0 < result.decoded_bytes < result.data_bytes


async def test_lookups_failing_on_a_database_damaged_in_place_are_counted_logged_and_reported(
        dbs: GeoIpConfig, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    geo = MaxMindGeoProvider(dbs, monotonic=clock)
    await geo.start()
    try:
        damage_in_place(dbs)
        with caplog.at_level(logging.ERROR, logger="gateway.geo.maxmind"):
            for _ in range(50):
                assert geo.lookup(CN).country is None  # unknown: the policy decides, as documented
            assert geo.lookup(TOR).is_tor_exit_node  # the other database still answers
            clock.advance(LOOKUP_ERROR_WINDOW)
            geo.lookup(CN)
        lines = [r.getMessage() for r in caplog.records if "lookups failing" in r.getMessage()]
        assert len(lines) == 2  # rate-limited: not one line per request
        assert "(1 since the last report, 1 in all)" in lines[0]
        assert "(50 since the last report, 51 in all)" in lines[1]
        assert all(str(CN) not in line for line in lines)
        assert geo.failing() == ("country",)
        info = {i.role: i for i in geo.databases()}["country"]
        assert info.lookup_errors == 51 and info.lookups_failing
        assert info.last_lookup_error is not None and "bad data" in info.last_lookup_error
        reason = lookups_failing(geo)
        assert reason is not None
        assert reason.startswith("country database lookups failing: InvalidDatabaseError")
        assert 'tollgate_geoip_lookup_errors_total{role="country"} 51.0' in scrape(geo)
        assert 'tollgate_geoip_lookups_failing{role="country"} 1.0' in scrape(geo)
        assert 'tollgate_geoip_lookup_errors_total{role="anonymous"} 0.0' in scrape(geo)
        clock.advance(LOOKUP_ERROR_WINDOW - 0.001)
        assert geo.failing() == ("country",)
        clock.advance(0.001)
        assert geo.failing() == () and lookups_failing(geo) is None  # a minute after the last error
        assert {i.role: i for i in geo.databases()}["country"].lookup_errors == 51
        assert 'tollgate_geoip_lookups_failing{role="country"} 0.0' in scrape(geo)
    finally:
        await geo.close()


def damage_in_place(dbs: GeoIpConfig) -> Path:
    """Damage the country database inside the mapped file itself (not replaced by rename): the
    open reader sees it. Returns its path."""
    path = dbs.country_db
    assert path is not None
    with open(path, "r+b") as file:
        file.seek(data_section_start(path))
        file.write(b"\xff" * 8)
    return path


def scrape(geo: MaxMindGeoProvider) -> str:
    registry = CollectorRegistry()
    registry.register(ComponentCollector(geo=geo.databases))
    return generate_latest(registry).decode()


async def test_a_good_replacement_clears_the_failing_state(dbs: GeoIpConfig) -> None:
    clock = FakeClock()
    geo = MaxMindGeoProvider(dbs, monotonic=clock)
    await geo.start()
    try:
        path = damage_in_place(dbs)
        geo.lookup(CN)
        assert geo.failing() == ("country",)
        write_country_db(path, {"1.0.0.0/24": "CN"})
        await geo.reload()
        assert geo.failing() == () and geo.lookup(CN).country == "CN"
    finally:
        await geo.close()


def test_every_damaged_byte_of_the_data_section_is_refused_or_harmless(tmp_path: Path) -> None:
    """Damage in the data section is a DatabaseDamaged or nothing (a value turned into another valid
    one): never another exception, and never a crash. On this file, 6 of these damages make
    libmaxminddb segfault in a lookup (and others raise UnicodeDecodeError or TypeError), so the
    verifier must decode the data section in Python before it makes a single lookup."""
    good = write_country_db(tmp_path / "good.mmdb", {"203.0.113.0/24": "CN", "5.0.0.0/8": ("DE", "FR")})
    data = good.read_bytes()
    bad = tmp_path / "bad.mmdb"
    outcomes = {"refused": 0, "harmless": 0}
    for offset in range(data_section_start(good), data.rindex(b"\xab\xcd\xefMaxMind.com")):
        for value in {0x00, 0xFF} - {data[offset]}:
            bad.write_bytes(data[:offset] + bytes([value]) + data[offset + 1:])
            with geoip2.database.Reader(str(bad)) as reader:
                try:
                    verify_database(bad, reader.country)
                    outcomes["harmless"] += 1
                except DatabaseDamaged:
                    outcomes["refused"] += 1
    assert outcomes["refused"] > outcomes["harmless"] > 0


async def test_an_ipv6_address_against_an_ipv4_only_database_is_not_an_error(tmp_path: Path) -> None:
    country = write_country_db(tmp_path / "v4.mmdb", {"1.0.0.0/24": "CN"}, ip_version=4)
    geo = MaxMindGeoProvider(GeoIpConfig(country_db=country, reload_interval=0))
    await geo.start()
    try:
        assert geo.lookup(ip("2001:db8::1")).country is None
        assert geo.lookup(CN).country == "CN"
        assert geo.failing() == () and geo.databases()[0].lookup_errors == 0
    finally:
        await geo.close()


async def test_a_record_of_the_wrong_shape_is_a_lookup_error_and_not_cached(tmp_path: Path) -> None:
    # A /32 that no verification probe reaches, whose record geoip2 cannot build a model from.
    records = {"1.0.0.0/24": country_record("CN"), "5.6.7.8/32": {"country": "XX"}}
    country = write_mmdb(tmp_path / "country.mmdb", COUNTRY_TYPE, records)
    geo = MaxMindGeoProvider(GeoIpConfig(country_db=country, reload_interval=0), monotonic=FakeClock())
    await geo.start()
    try:
        for _ in range(2):
            assert geo.lookup(ip("5.6.7.8")).country is None
        info = geo.databases()[0]
        assert info.lookup_errors == 2 and (info.last_lookup_error or "").startswith("TypeError")
        assert geo.failing() == ("country",)
    finally:
        await geo.close()


def test_a_file_replaced_while_being_opened_is_opened_again(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_country_db(tmp_path / "country.mmdb", {"1.0.0.0/24": "CN"})
    real_verify = verify_database
    calls = 0

    def verify_while_replaced(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:  # geoipupdate renames the next file in between the reader's open and ours
            write_country_db(path, {"1.0.0.0/24": "JP"})
        return real_verify(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(maxmind, "verify_database", verify_while_replaced)
    opened = open_database("country", path)
    try:
        assert calls == 2 and opened.method(CN).country.iso_code == "JP"
    finally:
        opened.reader.close()

