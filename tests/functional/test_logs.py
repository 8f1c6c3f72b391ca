"""The access log and the audit trail of a running gateway: whose id a request is recorded under,
what a client can put into a line, who vouched for the principal, and what happens when a log
cannot be written (refused at start, counted at run time, never an error to the client)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway, write_keys_file
from tests.support.redis_servers import free_port
from tests.unit.identity.tokens import AUDIENCE, ISSUER, claims, public_jwk, sign

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
PROMPT = "a confidential prompt about the merger"
HEX24 = re.compile(r"[0-9a-f]{24}")


def chat_body(model: str = "gpt-test") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}]}


async def chat(gw: RunningGateway, headers: dict[str, str] | None = None,
               body: dict[str, Any] | None = None, token: str = CLIENT_KEY) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(gw.url + CHAT, json=body or chat_body(),
                                                    headers=headers) as r:
        await r.read()
        return r.status, r.headers["x-request-id"]


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


async def test_requests_are_recorded_under_the_gateways_id_with_the_clients_beside_it(
        mock_upstream: MockServer, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    async with run_gateway(gateway_yaml(mock_upstream.url, tmp_path, audit_log=audit), tmp_path) as gw:
        # A client trying to file its request under another request's id.
        status, rid = await chat(gw, {"X-Request-Id": "victim-request-0001", "Request-Id": "victim-2"})
        upstream_saw = mock_upstream.state.requests[-1].headers
        status2, rid2 = await chat(gw)
        access = await gw.access_records()
        records = await gw.audit_records()
    assert status == status2 == 200
    assert HEX24.fullmatch(rid) and HEX24.fullmatch(rid2) and rid != rid2
    # The upstream gets the gateway's id, not the client's, under either name.
    assert upstream_saw["x-request-id"] == rid and "request-id" not in upstream_saw
    assert [r["request_id"] for r in access] == [rid, rid2]
    assert [r["request_id"] for r in records] == [rid, rid2]
    assert access[0]["client_request_id"] == records[0]["client_request_id"] == "victim-request-0001"
    assert "client_request_id" not in access[1] and records[1]["client_request_id"] is None
    assert PROMPT not in audit.read_text() and PROMPT not in gw.access_log.read_text()


async def raw_request(url: str, head: bytes, body: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


async def test_a_client_cannot_break_or_bloat_a_line(mock_upstream: MockServer, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    forged = '"}\u2028{"request_id":"forged","decision":"allow"}\u2029\x85\x0b'
    model = "gpt-test" + forged + "x" * 100_000
    body = orjson.dumps(chat_body(model))
    # Raw bytes: U+2028 in UTF-8, and a byte that is not UTF-8 at all, in the client's request id.
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
            "Content-Type: application/json\r\n").encode() + b"X-Request-Id: id\xe2\x80\xa8x\xff" \
        + b"y" * 5000 + b"\r\n"
    async with run_gateway(gateway_yaml(mock_upstream.url, tmp_path, audit_log=audit), tmp_path) as gw:
        response = await raw_request(gw.url, head, body)
        await gw.access_records()
        await gw.audit_records()
    assert response.startswith(b"HTTP/1.1 200")
    for path in (gw.access_log, audit):
        lines = lines_of(path)
        assert len(lines) == 1, path  # str.splitlines() splits on U+2028, U+2029, U+0085, \x0b...
        record = json.loads(lines[0])
        assert record["model"] == model[:256] + f"...[truncated {len(model) - 256} chars]"
        client_id = record["client_request_id"]
        # the byte that is not UTF-8 is shown escaped rather than losing the whole record
        assert client_id.startswith("id\u2028x\\udcffy") and client_id.endswith("...[truncated 4877 chars]")
        assert len(path.read_bytes()) < 2000


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def test_the_audit_record_names_the_credential_system_and_the_issuer(
        mock_upstream: MockServer, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1")]}))
    identity = (
        "identity:\n"
        f"  keys_file: {write_keys_file(tmp_path)}\n"
        "  jwt:\n"
        "    issuers:\n"
        f"      - {{issuer: '{ISSUER}', audience: {AUDIENCE}, algorithms: [RS256], jwks_file: jwks.json,\n"
        "         account_prefix: 'sso:', claims: {account: sub, org: org_id}}\n"
    )
    audit = tmp_path / "audit.jsonl"
    token = sign(rsa_key, claims(sub="acct-" + "9" * 500, org_id="org-7"))
    async with run_gateway(gateway_yaml(mock_upstream.url, tmp_path, identity, audit_log=audit),
                           tmp_path) as gw:
        assert (await chat(gw, token=token))[0] == 200
        assert (await chat(gw))[0] == 200
        jwt_record, key_record = await gw.audit_records()
    assert jwt_record["principal"] == {
        "authenticated": True, "source": "jwt", "issuer": ISSUER,
        "account": "sso:acct-" + "9" * 247 + "...[truncated 253 chars]", "org": "org-7", "tier": None,
        "key_id": None}
    assert key_record["principal"] == {"authenticated": True, "source": "api_key", "issuer": None,
                                       "account": "acct-1", "org": "org-1", "tier": "pro",
                                       "key_id": "key_0"}


def lost_records(gw: RunningGateway) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(gw.runtime.metrics.render().decode()):
        for s in family.samples:
            if s.name == "tollgate_log_records_lost_total":
                out[(s.labels["log"], s.labels["reason"])] = s.value
    return out


async def test_a_full_disk_costs_records_not_requests(mock_upstream: MockServer, tmp_path: Path) -> None:
    config = gateway_yaml(mock_upstream.url, tmp_path, audit_log=Path("/dev/full")).replace(
        f"access_log: {tmp_path / 'access.jsonl'}", "access_log: /dev/full")  # ENOSPC on every write
    async with run_gateway(config, tmp_path) as gw:
        statuses = [(await chat(gw))[0] for _ in range(5)]
        await gw.runtime.access_log.flush_now()
        sink = gw.runtime.features.audit_sink
        assert sink is not None
        await sink.flush()  # type: ignore[attr-defined]
        assert (await chat(gw))[0] == 200  # still serving
        lost = lost_records(gw)
    assert statuses == [200] * 5
    assert lost[("access", "write_error")] == 5 and lost[("audit", "write_error")] == 5
    assert lost[("access", "queue_full")] == lost[("audit", "queue_full")] == 0


def config_file(tmp: Path, logging_yaml: str) -> Path:
    path = tmp / "gateway.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {free_port()}}}\n"
        "admin: {enabled: false}\n"
        "mock_upstream: {enabled: true, port: 0}\n"
        f"identity: {{keys_file: {write_keys_file(tmp)}}}\n"
        "logging:\n" + logging_yaml
    )
    return path


@pytest.mark.parametrize(("logging_yaml", "expected"), [
    ("  access_log: null\n  audit_log: no/such/dir/audit.jsonl\n",
     ":7:14: logging.audit_log: cannot open {tmp}/no/such/dir/audit.jsonl for appending: "
     "No such file or directory"),
    ("  access_log: {tmp}\n",
     ":6:15: logging.access_log: cannot open {tmp} for appending: Is a directory"),
])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_gateway_run_refuses_a_log_it_cannot_write(tmp_path: Path, logging_yaml: str, expected: str,
                                                    workers: str) -> None:
    path = config_file(tmp_path, logging_yaml.format(tmp=tmp_path))
    command = [sys.executable, "-m", "gateway", "run", "--config", str(path), "--workers", workers]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TOLLGATE_CHALLENGE_SECRET": "s" * 32})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(f"{path}{expected.format(tmp=tmp_path)}") == 1  # once, not once per worker
    assert "Traceback" not in proc.stderr


async def test_a_reload_reopens_both_logs_after_rotation_by_rename(
        mock_upstream: MockServer, tmp_path: Path) -> None:
    """logrotate renames the files, then signals: records before go to the renamed files, records
    after to new files under the configured names (not to the renamed ones forever)."""
    audit = tmp_path / "audit.jsonl"
    async with run_gateway(gateway_yaml(mock_upstream.url, tmp_path, audit_log=audit), tmp_path) as gw:
        _, before = await chat(gw)
        _, buffered = await chat(gw)  # still in the buffers when the files are renamed
        gw.access_log.rename(tmp_path / "access.jsonl.1")
        audit.rename(tmp_path / "audit.jsonl.1")
        await gw.runtime.features.reload()  # what SIGHUP and POST /admin/reload run
        _, after = await chat(gw)
        access_now = await gw.access_records()
        audit_now = await gw.audit_records()

    def ids(path: Path) -> list[object]:
        return [json.loads(line)["request_id"] for line in path.read_text().splitlines()]

    assert ids(tmp_path / "access.jsonl.1") == ids(tmp_path / "audit.jsonl.1") == [before, buffered]
    assert [r["request_id"] for r in access_now] == [r["request_id"] for r in audit_now] == [after]
