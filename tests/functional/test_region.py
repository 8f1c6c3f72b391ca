"""Region enforcement (issue 4) through the real gateway, the shipped ``policies/`` and the SDKs.

A generated MMDB set (country, ASN, anonymous-IP) locates the test addresses; the TCP peer is
always 127.0.0.1, so a "direct" client is emulated by trusting loopback as one proxy hop that
appends the client's address to ``X-Forwarded-For``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anthropic
import openai
import pytest

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import (
    CLIENT_ACCOUNT,
    CLIENT_KEY,
    RunningGateway,
    gateway_yaml,
    run_gateway,
    write_keys_file,
)
from tests.support.mmdb import write_anonymous_db, write_asn_db, write_country_db

POLICIES = Path(__file__).resolve().parents[2] / "policies"

RESTRICTED = "203.0.113.9"  # CN in the fixture database
ALLOWED = "198.51.100.7"  # US
VPN = "198.51.100.70"  # US, flagged as an anonymous VPN exit
UNKNOWN = "192.0.2.44"  # public, in no database
RU_ORG_KEY = "tg_test_client_key_ru_org"
NEUTRAL = "This request is not permitted."

GatewayStarter = Callable[..., AbstractAsyncContextManager[RunningGateway]]


def teredo(ipv4: str, server: str = "65.54.227.120") -> str:
    """RFC 4380: 2001:0:<server>:<flags>:<port ^ 0xffff>:<client ^ 0xffffffff>."""
    client = int(ipaddress.IPv4Address(ipv4)) ^ 0xFFFFFFFF
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64) | (0x8000 << 48)
    value |= (0x63BF << 32) | client
    return str(ipaddress.IPv6Address(value))


def six_to_four(ipv4: str) -> str:
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(ipv4)) << 80) | 1))


@pytest.fixture(scope="module")
def geo_dbs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("geoip")
    return {
        "country_db": write_country_db(
            folder / "country.mmdb", {"203.0.113.0/24": "CN", "198.51.100.0/24": "US"}
        ),
        "asn_db": write_asn_db(
            folder / "asn.mmdb", {"203.0.113.0/24": (4134, "CHINANET"), "198.51.100.0/24": (64500, "Example")}
        ),
        "anonymous_db": write_anonymous_db(folder / "anon.mmdb", {"198.51.100.64/26": {"is_anonymous_vpn"}}),
    }


@pytest.fixture
def start_region_gateway(
    mock_upstream: MockServer, tmp_path: Path, geo_dbs: dict[str, Path]
) -> GatewayStarter:
    """``async with start_region_gateway(trusted=[...]) as gw``: the shipped policies, the fixture
    MMDBs, a normal key (acct-1) and a key of an org registered in Russia."""

    @contextlib.asynccontextmanager
    async def start(
        trusted: tuple[str, ...] = ("127.0.0.1/32",), policies: Path = POLICIES
    ) -> AsyncIterator[RunningGateway]:
        keys = write_keys_file(
            tmp_path,
            {
                CLIENT_KEY: {"account": CLIENT_ACCOUNT, "org": "org-1", "tier": "pro"},
                RU_ORG_KEY: {
                    "account": "acct-ru",
                    "org": "org-ru",
                    "tier": "pro",
                    "attributes": {"org_country": "RU"},
                },
            },
        )
        extra = (
            f"identity: {{keys_file: {keys}}}\n"
            f"client_ip: {{trusted_proxies: {json.dumps(list(trusted))}}}\n"
            "geoip:\n"
            + "".join(f"  {slot}: {path}\n" for slot, path in geo_dbs.items())
            + f"policies: {{dir: {policies}, watch: false}}\n"
        )
        text = gateway_yaml(mock_upstream.url, tmp_path, extra, audit_log=tmp_path / "audit.jsonl")
        async with run_gateway(text, tmp_path) as gw:
            yield gw

    return start


def openai_client(
    gw: RunningGateway, forwarded_for: str | None = None, key: str = CLIENT_KEY
) -> openai.AsyncOpenAI:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, default_headers=headers)


def anthropic_client(gw: RunningGateway, forwarded_for: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0,
                                    default_headers={"X-Forwarded-For": forwarded_for})


async def chat(c: openai.AsyncOpenAI) -> str:
    result = await c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert result.choices[0].message.content
    return result.id


async def assert_refused(c: openai.AsyncOpenAI) -> openai.PermissionDeniedError:
    with pytest.raises(openai.PermissionDeniedError) as info:
        await chat(c)
    err = info.value
    assert err.status_code == 403
    assert isinstance(err.body, dict) and err.body["message"] == NEUTRAL, err.body
    body = err.response.text
    assert "region" not in body and "CN" not in body, body  # neither the rule nor the country leaks
    assert err.response.headers["x-should-retry"] == "false"
    return err


async def last_audit(gw: RunningGateway) -> dict[str, object]:
    records = await gw.audit_records()
    assert records, "no audit record written"
    return records[-1]


async def test_direct_client_in_restricted_country_is_refused(start_region_gateway: GatewayStarter) -> None:
    async with start_region_gateway() as gw, openai_client(gw, RESTRICTED) as c:
        await assert_refused(c)
        record = await last_audit(gw)
    assert record["rule_id"] == "region-restricted-ip" and record["status"] == 403
    assert record["decision"] == "deny" and record["error_type"] == "permission"
    assert record["client"] == {"ip": RESTRICTED, "country": "CN", "asn": 4134}
    assert record["matched_rules"] == ["region-restricted-ip"]


async def test_allowed_country_passes_with_its_geo_in_the_audit(start_region_gateway: GatewayStarter) -> None:
    async with start_region_gateway() as gw, openai_client(gw, ALLOWED) as c:
        await chat(c)
        record = await last_audit(gw)
    assert record["decision"] == "allow" and record["status"] == 200 and record["rule_id"] is None
    assert record["client"] == {"ip": ALLOWED, "country": "US", "asn": 64500}


async def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored(
    start_region_gateway: GatewayStarter,
) -> None:
    # Loopback is not trusted, so X-Forwarded-For is only the caller's claim: the client is the
    # peer (127.0.0.1, a same-host caller the shipped policy allows), whatever the header says.
    async with start_region_gateway(trusted=()) as gw:
        async with openai_client(gw, RESTRICTED) as c:
            await chat(c)  # the real peer, 127.0.0.1, is a same-host caller: allowed
        async with openai_client(gw, ALLOWED) as c:
            await chat(c)
        records = await gw.audit_records()
    assert [r["client"] for r in records] == [{"ip": "127.0.0.1", "country": None, "asn": None}] * 2


@pytest.mark.parametrize(
    ("trusted", "forwarded_for"),
    [
        pytest.param(("127.0.0.1/32", "10.0.0.0/8"), f"{RESTRICTED}, 10.1.2.3", id="two-trusted-hops"),
        pytest.param(
            ("127.0.0.1/32", "10.0.0.0/8"),
            f"{ALLOWED}, {RESTRICTED}, 10.1.2.3",
            id="spoofed-left-of-real-client",
        ),
        pytest.param(("127.0.0.1/32",), f"{ALLOWED}, {RESTRICTED}", id="one-trusted-hop-spoofed-left"),
    ],
)
async def test_restricted_client_behind_trusted_proxies_is_refused(
    start_region_gateway: GatewayStarter, trusted: tuple[str, ...], forwarded_for: str
) -> None:
    async with start_region_gateway(trusted=trusted) as gw, openai_client(gw, forwarded_for) as c:
        await assert_refused(c)
        record = await last_audit(gw)
    assert record["rule_id"] == "region-restricted-ip"
    assert record["client"] == {"ip": RESTRICTED, "country": "CN", "asn": 4134}


async def test_untrusted_hop_in_the_chain_is_the_client(start_region_gateway: GatewayStarter) -> None:
    # 10.1.2.3 is not trusted here, so it is the client: a private address, no country, refused.
    async with start_region_gateway(trusted=("127.0.0.1/32",)) as gw:
        async with openai_client(gw, f"{ALLOWED}, 10.1.2.3") as c:
            await assert_refused(c)
        record = await last_audit(gw)
    assert record["rule_id"] == "region-unknown-country"
    assert record["client"] == {"ip": "10.1.2.3", "country": None, "asn": None}


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(f"::ffff:{RESTRICTED}", id="ipv4-mapped"),
        pytest.param(f"::{RESTRICTED}", id="ipv4-compatible"),
        pytest.param(six_to_four(RESTRICTED), id="6to4"),
        pytest.param(teredo(RESTRICTED), id="teredo"),
        pytest.param(f"64:ff9b::{RESTRICTED}", id="nat64"),
    ],
)
async def test_ipv6_tunnel_forms_of_a_restricted_address_are_refused(
    start_region_gateway: GatewayStarter, form: str
) -> None:
    async with start_region_gateway() as gw, openai_client(gw, form) as c:
        await assert_refused(c)
        record = await last_audit(gw)
    assert record["rule_id"] == "region-restricted-ip"
    assert record["client"] == {"ip": RESTRICTED, "country": "CN", "asn": 4134}


def test_tunnel_helpers_embed_the_address() -> None:
    assert six_to_four(RESTRICTED) == "2002:cb00:7109::1"
    assert teredo("216.160.83.56") == "2001:0:4136:e378:8000:63bf:275f:acc7"  # the docs' example


async def test_unknown_public_address_fails_closed(start_region_gateway: GatewayStarter) -> None:
    async with start_region_gateway() as gw, openai_client(gw, UNKNOWN) as c:
        await assert_refused(c)
        record = await last_audit(gw)
    assert record["rule_id"] == "region-unknown-country"
    assert record["client"] == {"ip": UNKNOWN, "country": None, "asn": None}


async def test_restricted_org_is_refused_from_an_allowed_ip(start_region_gateway: GatewayStarter) -> None:
    async with start_region_gateway() as gw:
        async with openai_client(gw, ALLOWED, key=RU_ORG_KEY) as c:
            await assert_refused(c)
        async with openai_client(gw, ALLOWED) as c:
            await chat(c)  # the same IP with another org's key is fine
        denied, allowed = await gw.audit_records()
    assert denied["rule_id"] == "region-restricted-org"
    assert denied["client"] == {"ip": ALLOWED, "country": "US", "asn": 64500}
    assert isinstance(denied["principal"], dict) and denied["principal"]["account"] == "acct-ru"
    assert allowed["decision"] == "allow"


async def test_anthropic_sdk_gets_a_permission_error(start_region_gateway: GatewayStarter) -> None:
    async with (
        start_region_gateway() as gw,
        anthropic_client(gw, RESTRICTED) as c,
    ):
        with pytest.raises(anthropic.PermissionDeniedError) as info:
            await c.messages.create(
                model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
            )
        record = await last_audit(gw)
    err = info.value
    assert err.status_code == 403
    assert isinstance(err.body, dict) and err.body["type"] == "error", err.body
    assert err.body["error"] == {"type": "permission_error", "message": NEUTRAL}
    assert "region" not in err.response.text
    assert record["rule_id"] == "region-restricted-ip" and record["api"] == "anthropic"


async def test_models_listing_is_refused_in_each_sdks_grammar(start_region_gateway: GatewayStarter) -> None:
    async with (
        start_region_gateway() as gw,
        anthropic_client(gw, RESTRICTED) as c,
        openai_client(gw, RESTRICTED) as o,
    ):
        with pytest.raises(anthropic.PermissionDeniedError) as info:
            await c.models.list()
        anthropic_record = await last_audit(gw)
        with pytest.raises(openai.PermissionDeniedError) as oinfo:
            await o.models.list()
        openai_record = await last_audit(gw)
    err = info.value
    assert isinstance(err.body, dict) and err.body["type"] == "error", err.body
    assert err.body["error"] == {"type": "permission_error", "message": NEUTRAL}
    assert oinfo.value.body == {"message": NEUTRAL, "type": "permission_error", "param": None,
                                "code": "permission_denied"}
    # request.api (audit, policy fields) is the client's family on the path both APIs define
    assert anthropic_record["route"] == openai_record["route"] == "models"
    assert anthropic_record["api"] == "anthropic" and openai_record["api"] == "openai"


async def test_vpn_flag_is_visible_to_the_shipped_policy(start_region_gateway: GatewayStarter) -> None:
    # 20-friction.yaml tags anonymiser traffic (client.is_anonymous_vpn); the tag reaches the audit.
    async with start_region_gateway() as gw:
        async with openai_client(gw, VPN) as c:
            await chat(c)
        async with openai_client(gw, ALLOWED) as c:
            await chat(c)
        vpn, plain = await gw.audit_records()
    assert vpn["decision"] == "allow" and "friction-anonymiser" in vpn["matched_rules"]  # type: ignore[operator]
    assert vpn["tags"] == ["anonymiser"]
    assert plain["tags"] == [] and "friction-anonymiser" not in plain["matched_rules"]  # type: ignore[operator]


async def test_vpn_flag_can_deny(start_region_gateway: GatewayStarter, tmp_path: Path) -> None:
    policies = tmp_path / "vpn-policies"
    policies.mkdir()
    (policies / "10-vpn.yaml").write_text(
        "version: 1\n"
        "rules:\n"
        "  - id: no-vpn\n"
        "    when: {field: client.is_anonymous_vpn, equals: true}\n"
        "    deny: true\n"
    )
    async with start_region_gateway(policies=policies) as gw:
        async with openai_client(gw, VPN) as c:
            await assert_refused(c)
        async with openai_client(gw, ALLOWED) as c:
            await chat(c)
        vpn, plain = await gw.audit_records()
    assert vpn["rule_id"] == "no-vpn" and plain["decision"] == "allow"


async def test_refused_credentials_are_audited_with_the_client_address(
    start_region_gateway: GatewayStarter,
) -> None:
    # Credential stuffing must be attributable: the address is resolved before the credential.
    async with start_region_gateway() as gw, openai_client(gw, RESTRICTED, key="tg_not_a_real_key") as c:
        with pytest.raises(openai.AuthenticationError):
            await chat(c)
        record = await last_audit(gw)
    assert record["status"] == 401
    assert record["client"] == {"ip": RESTRICTED, "country": "CN", "asn": 4134}
