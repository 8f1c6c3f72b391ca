"""A GeoIP database damaged under a running gateway: lookups fail, so /readyz fails and names the
database, the admin status and /metrics show it, and a good replacement makes the gateway ready."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import maxminddb

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, gateway_yaml, run_gateway
from tests.support.gateway import admin_listener as admin
from tests.support.mmdb import write_anonymous_db, write_country_db

RESTRICTED = "203.0.113.9"  # CN in the fixture database


def damage_in_place(path: Path) -> None:
    """Overwrite the start of the data section inside the file the gateway has mapped (a disk error,
    or a copy over the file instead of a rename): the loaded reader sees the damage."""
    with maxminddb.open_database(str(path)) as reader:
        meta = reader.metadata()
        start = meta.node_count * meta.record_size // 4 + 16
    with open(path, "r+b") as file:
        file.seek(start)
        file.write(b"\xff" * 8)


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def test_failing_geo_lookups_fail_readiness_and_are_counted(
        mock_upstream: MockServer, tmp_path: Path) -> None:
    country = write_country_db(tmp_path / "country.mmdb", {"203.0.113.0/24": "CN"})
    anonymous = write_anonymous_db(tmp_path / "anon.mmdb", {"198.51.100.64/26": {"is_anonymous_vpn"}})
    extra = ("client_ip: {trusted_proxies: [127.0.0.1/32]}\n"
             f"geoip: {{country_db: {country}, anonymous_db: {anonymous}, reload_interval: 0}}\n")
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "X-Forwarded-For": RESTRICTED}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with run_gateway(gateway_yaml(mock_upstream.url, tmp_path, extra), tmp_path) as gw, \
            admin(gw) as admin_url, aiohttp.ClientSession() as session:
        status, ready = await get_json(session, gw.url + "/readyz")
        assert status == 200 and ready["not_ready"] == {}
        damage_in_place(country)
        async with session.post(gw.url + "/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == 200  # served, with the country unknown (no policy here)

        status, ready = await get_json(session, gw.url + "/readyz")
        assert status == 503 and ready["ready"] is False
        reason = ready["not_ready"]["geoip"]
        assert reason.startswith("country database lookups failing: InvalidDatabaseError"), reason
        databases = {db["role"]: db for db in ready["geoip"]}
        assert databases["country"]["lookups_failing"] and databases["country"]["lookup_errors"] == 1
        assert databases["country"]["verified"] == "complete"  # as loaded, before the damage
        assert not databases["anonymous"]["lookups_failing"]
        _, detail = await get_json(session, admin_url + "/admin/status")
        assert "country database" in detail["not_ready"]["geoip"] and detail["ready"] is False
        async with session.get(admin_url + "/metrics") as response:
            metrics = await response.text()
        assert 'tollgate_geoip_lookup_errors_total{role="country"} 1.0' in metrics
        assert 'tollgate_geoip_lookups_failing{role="country"} 1.0' in metrics

        # geoipupdate renames a good file in: reloaded, and the gateway is ready again.
        write_country_db(country, {"203.0.113.0/24": "CN"})
        await gw.runtime.features.reload()
        status, ready = await get_json(session, gw.url + "/readyz")
        assert status == 200 and ready["not_ready"] == {}
