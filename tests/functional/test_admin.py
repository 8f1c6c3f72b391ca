"""The admin listener: metrics, status, authenticated reload and explain against live policies."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from gateway.upstream.mock_server import MockServer
from tests.conftest import GatewayFactory
from tests.support.gateway import CLIENT_KEY, RunningGateway, write_keys_file
from tests.support.gateway import admin_listener as admin
from tests.unit.identity.tokens import ISSUER, public_jwk

POLICY = """version: 1
rules:
  - id: no-big-n
    when: {field: request.n, gt: 2}
    deny: {status: 400, error_type: invalid_request, message: Too many choices.}
"""


async def chat(gw: RunningGateway, n: int) -> int:
    body = {"model": "m", "n": n, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ) as r,
    ):
        return r.status


async def raw_status(url: str, header: bytes) -> int:
    """POST /admin/reload with a header line as raw bytes (aiohttp's client would not send them)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /admin/reload HTTP/1.1\r\nHost: admin\r\n" + header
                 + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return int(status_line.split()[1])


async def test_metrics_status_reload_and_explain(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy_dir = tmp_path / "pol"
    policy_dir.mkdir()
    (policy_dir / "rules.yaml").write_text(POLICY)
    monkeypatch.setenv("TG_TEST_ADMIN_TOKEN", "admin-secret")
    extra = f"policies: {{dir: {policy_dir}, watch: false}}\nadmin: {{token_env: TG_TEST_ADMIN_TOKEN}}\n"
    async with start_gateway(mock_upstream.url, extra.replace("admin: {enabled: false}\n", "")) as gw:
        assert await chat(gw, 3) == 400
        async with admin(gw) as url, aiohttp.ClientSession() as s:
            async with s.get(url + "/metrics") as r:
                text = await r.text()
                assert 'tollgate_requests_total{route="chat.completions",status="400"} 1.0' in text
                assert 'tollgate_decisions_total{decision="invalid_request"} 1.0' in text
            async with s.get(url + "/admin/status") as r:
                status = await r.json()
                assert status["policy"]["rules"] == 1 and status["ready"] is True
            # A mutating call without the token is refused.
            async with s.post(url + "/admin/reload") as r:
                assert r.status == 401
            assert await raw_status(url, b"Authorization: Bearer \xff\xfeadmin-secret\r\n") == 401
            (policy_dir / "rules.yaml").write_text(POLICY.replace("gt: 2", "gt: 5"))
            auth = {"Authorization": "Bearer admin-secret"}
            async with s.post(url + "/admin/reload", headers=auth) as r:
                assert r.status == 200
            assert await chat(gw, 3) == 200  # the new snapshot serves
            # A broken policy is refused; the last good one keeps serving.
            (policy_dir / "rules.yaml").write_text("version: 1\nrules:\n  - id: x\n    wen: {}\n")
            async with s.post(url + "/admin/reload", headers=auth) as r:
                body = await r.json()
                assert "wen" in body["policy"]["last_error"]
            assert await chat(gw, 3) == 200 and await chat(gw, 6) == 400
            async with s.get(url + "/metrics") as r:
                text = await r.text()
            assert 'tollgate_policy_reloads_total{result="ok"} 1.0' in text
            assert 'tollgate_policy_reloads_total{result="failed"} 1.0' in text
            assert "tollgate_policy_last_reload_failed 1.0" in text
            assert "tollgate_store_calls_total" in text
            assert 'tollgate_store_fallbacks_total{mode="local"} 0.0' in text
            assert "tollgate_store_leases_lost_total 0.0" in text
            async with s.post(url + "/admin/explain", headers=auth, json={"request": {"n": 6}}) as r:
                explained = await r.json()
                assert explained["decision"] == "deny" and explained["rule_id"] == "no-big-n"


async def test_reload_answers_422_when_the_policy_set_is_refused_and_counts_each_result(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deploy script must see a refused set in the status code, and the metric must tell ok,
    unchanged and failed apart (one label value per outcome, whatever triggered it)."""
    policy_dir = tmp_path / "pol"
    policy_dir.mkdir()
    (policy_dir / "rules.yaml").write_text(POLICY)
    monkeypatch.setenv("TG_TEST_ADMIN_TOKEN", "admin-secret")
    extra = f"policies: {{dir: {policy_dir}, watch: false}}\nadmin: {{token_env: TG_TEST_ADMIN_TOKEN}}\n"
    auth = {"Authorization": "Bearer admin-secret"}
    async with start_gateway(mock_upstream.url, extra) as gw, admin(gw) as url, aiohttp.ClientSession() as s:
        revision = gw.runtime.features.policy.revision

        async def reload() -> tuple[int, dict[str, object]]:
            async with s.post(url + "/admin/reload", headers=auth) as r:
                return r.status, await r.json()

        status, body = await reload()
        assert (status, body["reloaded"], body["result"]) == (200, True, "unchanged")
        assert "error" not in body
        (policy_dir / "rules.yaml").write_text("version: 1\nrules:\n  - id: x\n    wen: {}\n")
        status, body = await reload()
        assert (status, body["reloaded"], body["result"]) == (422, False, "failed")
        assert "rules.yaml:4:5: rules[0].wen: unknown key 'wen'" in str(body["error"])
        (policy_dir / "rules.yaml").unlink()  # emptied: refused too, not "allow everything"
        status, body = await reload()
        assert status == 422 and f"{policy_dir}:1:1: no policy files" in str(body["error"])
        assert gw.runtime.features.policy.revision == revision and await chat(gw, 3) == 400
        (policy_dir / "rules.yaml").write_text(POLICY.replace("gt: 2", "gt: 5"))
        status, body = await reload()
        assert (status, body["reloaded"], body["result"]) == (200, True, "ok") and await chat(gw, 3) == 200
        async with s.get(url + "/metrics") as r:
            text = await r.text()
        reloads = {sample.labels["result"]: sample.value for family in text_string_to_metric_families(text)
                   if family.name == "tollgate_policy_reloads"
                   for sample in family.samples if sample.name == "tollgate_policy_reloads_total"}
        assert reloads == {"unchanged": 1, "failed": 2, "ok": 1}


async def test_status_and_metrics_show_how_fresh_each_jwt_issuers_keys_are(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """One issuer whose key set loaded, one whose identity provider cannot be reached: the SRE
    sees the second's keys missing (stale, never fetched) before any of its tokens is refused."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public_jwk(key, "k1")]}))
    down = "https://down.example.com/"
    issuer = ("{{issuer: '{}', account_prefix: '{}', audience: tollgate, algorithms: [RS256], jwks_file: {},"
              " jwks_max_stale: 1h}}")
    extra = ("identity:\n"
             f"  keys_file: {write_keys_file(tmp_path)}\n"
             "  jwt:\n"
             "    issuers:\n"
             f"      - {issuer.format(ISSUER, 'idp:', 'jwks.json')}\n"
             f"      - {issuer.format(down, 'down:', 'missing-jwks.json')}\n")
    async with start_gateway(mock_upstream.url, extra) as gw, admin(gw) as url, aiohttp.ClientSession() as s:
        async def issuers() -> dict[str, dict[str, object]]:
            async with s.get(url + "/admin/status") as r:
                found: dict[str, dict[str, object]] = (await r.json())["identity"]["jwt_issuers"]
                return found

        async with asyncio.timeout(5):  # both fetched at start-up, in the background
            while ((status := await issuers())[ISSUER]["last_success_age_seconds"] is None
                   or status[down]["failures"] == 0):
                await asyncio.sleep(0.02)
        loaded, missing = status[ISSUER], status[down]
        assert (loaded["stale"], loaded["failures"]) == (False, 0)
        age = loaded["last_success_age_seconds"]
        assert isinstance(age, float) and 0 <= age < 5
        assert isinstance(loaded["stale_in_seconds"], float) and 3595 < loaded["stale_in_seconds"] <= 3600
        assert missing == {"fetches": 1, "failures": 1, "last_success_age_seconds": None,
                           "stale_in_seconds": 0.0, "stale": True}
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    jwks = {(sample.name, sample.labels["issuer"]): sample.value
            for family in text_string_to_metric_families(text) if family.name.startswith("tollgate_jwks_")
            for sample in family.samples}
    names = ("tollgate_jwks_age_seconds", "tollgate_jwks_stale_in_seconds",
             "tollgate_jwks_fetch_failures_total")
    assert jwks.keys() == {(name, i) for name in names for i in (ISSUER, down)}
    assert 0 <= jwks[("tollgate_jwks_age_seconds", ISSUER)] < 5
    assert 3595 < jwks[("tollgate_jwks_stale_in_seconds", ISSUER)] <= 3600
    assert jwks[("tollgate_jwks_fetch_failures_total", ISSUER)] == 0
    assert jwks[("tollgate_jwks_age_seconds", down)] == math.inf
    assert jwks[("tollgate_jwks_stale_in_seconds", down)] == 0.0
    assert jwks[("tollgate_jwks_fetch_failures_total", down)] == 1
