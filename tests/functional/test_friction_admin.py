"""Sticky friction through the real gateway is reversible by an operator, and the reversal is
audited: a reverify challenge sticks to the account after the rule stops matching, is listed with
why (the request and risk that saved it), cleared with ``gateway friction clear`` (a client of the
admin API), and the clear lands in the account's history and in the audit log beside the request
records. On the memory risk store and on Redis (behind its local mirror, the default mode)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_ACCOUNT, CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway
from tests.support.gateway import admin_listener as admin
from tests.support.redis_servers import RedisServer

REPO = Path(__file__).resolve().parents[2]
TOKEN_ENV = "TG_TEST_FRICTION_ADMIN_TOKEN"
POLICY = """\
version: 1
rules:
  - id: reverify-suspect-model
    description: Asking for the model distillers target means re-verifying the account.
    when: {field: request.model, equals: suspect}
    friction: {challenge: {kind: reverify, url: "https://verify.example/acct"}}
"""


async def chat(gw: RunningGateway, model: str) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + "/v1/chat/completions", json=body,
               headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as r,
    ):
        return r.status, await r.json()


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "friction", *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_sticky_reverify_is_listed_cleared_by_the_cli_and_audited(
        backend: str, mock_upstream: MockServer, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "friction-admin-secret")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "rules.yaml").write_text(POLICY)
    extra = f"policies: {{dir: {policies}, watch: false}}\nadmin: {{token_env: {TOKEN_ENV}}}\n"
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        extra += f"risk: {{store: {{backend: redis, url: '{server.url}', prefix: 'fr-test:'}}}}\n"
    audit_log = tmp_path / "audit.jsonl"
    config = gateway_yaml(mock_upstream.url, tmp_path, extra, audit_log=audit_log)
    async with run_gateway(config, tmp_path) as gw:
        status, body = await chat(gw, "suspect")
        assert status == 403 and body["error"]["code"] == "reverification_required"
        status, _ = await chat(gw, "m")  # the rule no longer matches: the state does
        assert status == 403
        async with admin(gw) as url:
            code, out, err = await cli("list", CLIENT_ACCOUNT, "--admin-url", url, "--token-env", TOKEN_ENV)
            assert code == 0, err
            listing = json.loads(out)
            saved = listing["friction"]["reverify-suspect-model"]
            assert saved["action"]["reverify"]["url"] == "https://verify.example/acct"
            assert saved["request_id"] and "score" in saved["risk"] and listing["history"] == []

            code, out, err = await cli("clear", CLIENT_ACCOUNT, "--admin-url", url, "--by", "alice")
            assert code == 1 and "401" in err  # no token: refused, nothing cleared
            code, out, err = await cli("clear", CLIENT_ACCOUNT, "--admin-url", url, "--token-env", TOKEN_ENV,
                                       "--by", "alice", "--reason", "ticket 42: verified by phone",
                                       "--reverify")
            assert code == 0, err
            assert json.loads(out)["cleared"] == ["reverify-suspect-model"]

            status, _ = await chat(gw, "m")
            assert status == 200  # released

            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{url}/admin/friction/{CLIENT_ACCOUNT}",
                      headers={"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}) as r,
            ):
                after = await r.json()
        assert after["friction"] == {}
        [event] = after["history"]
        assert (event["by"], event["reason"], event["scope"]) == ("alice", "ticket 42: verified by phone",
                                                                  "reverify")
        assert event["cleared"]["reverify-suspect-model"]["request_id"] == saved["request_id"]
        records = await gw.audit_records()
    requests = [r for r in records if "request_id" in r]
    assert [r["status"] for r in requests] == [403, 403, 200]
    first = requests[0]["extra"]["friction"]  # type: ignore[index]
    assert first["effect"] == "reverify" and first["saved"][0]["rule"] == "reverify-suspect-model"
    assert requests[0]["rule_id"] == "reverify-suspect-model"
    assert requests[1]["extra"]["friction"]["applied"] == [  # type: ignore[index]
        {"rule": "reverify-suspect-model", "effects": ["reverify"], "sticky": True}]
    [cleared] = [r for r in records if r.get("event") == "friction_cleared"]
    assert cleared["account"] == CLIENT_ACCOUNT and cleared["by"] == "alice"
    assert cleared["peer"] == "127.0.0.1" and str(cleared["ts"]).endswith("+00:00")
    assert list(cleared["cleared"]) == ["reverify-suspect-model"]  # type: ignore[call-overload]


async def test_sticky_friction_is_suspended_while_its_rule_is_shadow_or_removed(
        mock_upstream: MockServer, tmp_path: Path) -> None:
    """An operator who shadows or deletes a misfiring rule releases every account it trapped at
    once; re-enforcing the rule within the record's ttl resumes the friction."""
    policies = tmp_path / "policies"
    policies.mkdir()
    rules = policies / "rules.yaml"
    rules.write_text(POLICY)
    audit_log = tmp_path / "audit.jsonl"
    config = gateway_yaml(mock_upstream.url, tmp_path, f"policies: {{dir: {policies}, watch: false}}\n",
                          audit_log=audit_log)
    async with run_gateway(config, tmp_path) as gw:
        assert (await chat(gw, "suspect"))[0] == 403  # saved as sticky
        assert (await chat(gw, "m"))[0] == 403
        rules.write_text(POLICY.replace("    when:", "    mode: shadow\n    when:"))
        await gw.runtime.features.reload()
        assert (await chat(gw, "m"))[0] == 200  # shadow: suspended
        rules.write_text("version: 1\n")
        await gw.runtime.features.reload()
        assert (await chat(gw, "m"))[0] == 200  # removed: suspended
        rules.write_text(POLICY)
        await gw.runtime.features.reload()
        assert (await chat(gw, "m"))[0] == 403  # enforced again within the ttl: resumes
        records = [r for r in await gw.audit_records() if "request_id" in r]
    notes: list[Any] = [r.get("extra", {}) for r in records]
    assert [n.get("friction", {}).get("suspended") for n in notes] == [None, None, ["reverify-suspect-model"],
                                                   ["reverify-suspect-model"], None]
