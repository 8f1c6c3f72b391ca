"""Client IP resolution behind trusted proxies, address normalisation and CIDR sets."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.ipaddr import (
    CidrSet,
    normalize,
    parse_host,
    parse_ip,
    parse_network,
)
from gateway.stages.client_ip import ClientIpStage
from gateway.yamlsource import ConfigError
from tests.support.client_ip import PROXIES, ip, parse, resolve


# ---- normalisation ----------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("216.160.83.56", "216.160.83.56"),
    ("::ffff:216.160.83.56", "216.160.83.56"),  # IPv4-mapped
    ("::216.160.83.56", "216.160.83.56"),  # IPv4-compatible (deprecated)
    ("2002:d8a0:5338::1", "216.160.83.56"),  # 6to4
    ("2002:d8a0:5338:1234:5678::9", "216.160.83.56"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # RFC 4380 example: client inverted
    ("2001:0:d8a0:5338:0:0:275f:acc7", "216.160.83.56"),  # Teredo whose client is 216.160.83.56
    ("::1", "::1"), ("::", "::"), ("2001:db8::1", "2001:db8::1"),
    # ::/104 (IPv4 0.0.0.0/8, never a routed client) stays IPv6; from ::1.0.0.0 on it is IPv4
    ("::2", "::2"), ("::0.0.0.255", "::ff"), ("::0.255.255.255", "::ff:ffff"), ("::1.0.0.0", "1.0.0.0"),
    ("2001:1::1", "2001:1::1"),  # 2001:1::/32 is not Teredo
    ("64:ff9b::216.160.83.56", "216.160.83.56"),  # NAT64, well-known prefix (RFC 6052)
    ("64:ff9b::d8a0:5338", "216.160.83.56"),
    ("64:ff9b:1::d8a0:5338", "64:ff9b:1::d8a0:5338"),  # local-use NAT64: its layout is the operator's
    ("64:ff9b:0:0:1::d8a0:5338", "64:ff9b:0:0:1::d8a0:5338"),  # outside the /96
])
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(ip(raw)) == ip(expected)


def test_zone_ids_are_dropped() -> None:
    assert parse_ip("fe80::1%eth0") == ip("fe80::1")
    assert str(normalize(ipaddress.IPv6Address("fe80::1%eth0"))) == "fe80::1"
    assert parse_host("[fe80::1%25eth0]:8080") == ip("fe80::1")


@pytest.mark.parametrize("text, expected", [
    ("1.2.3.4", "1.2.3.4"), ("1.2.3.4:8080", "1.2.3.4"), ("[2001:db8::1]:443", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"), ("2001:db8::1", "2001:db8::1"), ('"[2001:db8::1]:80"', "2001:db8::1"),
    (" ::ffff:1.2.3.4 ", "1.2.3.4"),
])
def test_parse_host(text: str, expected: str) -> None:
    assert parse_host(text) == ip(expected)


@pytest.mark.parametrize("text", [
    "", "unknown", "_hidden", "1.2.3.4:", "1.2.3.4:http", "[2001:db8::1", "[2001:db8::1]x", "999.1.1.1",
    "1.2.3", "x" * 500, "[1.2.3.4]:80:90", "1.2.3.4 5.6.7.8",
])
def test_parse_host_rejects_garbage(text: str) -> None:
    assert parse_host(text) is None


def test_cidr_set_membership() -> None:
    cs = CidrSet.parse(["10.0.0.0/8", "203.0.113.7", "::ffff:172.16.0.0/108", "2001:db8::/32"])
    assert ip("10.255.0.1") in cs and ip("203.0.113.7") in cs and ip("203.0.113.8") not in cs
    assert ip("172.31.255.255") in cs  # mapped network stored as 172.16.0.0/12
    assert ip("2001:db8:ffff::1") in cs and ip("2001:db9::1") not in cs
    assert "10.0.0.1" not in cs  # strings are not addresses
    assert not CidrSet() and len(cs) == 4


def test_cidr_parse_errors_name_the_entry() -> None:
    with pytest.raises(ValueError, match="host bits set; did you mean '10.0.0.0/8'"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ValueError, match="'banana' is not an IP address or CIDR"):
        CidrSet.parse(["10.0.0.0/8", "banana"])


# ---- client IP --------------------------------------------------------------------------------
async def test_direct_client_uses_peer() -> None:
    ctx = await resolve("203.0.113.9")
    assert ctx.client.ip == ip("203.0.113.9") and ctx.client.forwarded_chain == ()


async def test_mapped_peer_is_normalised_before_trust_check() -> None:
    ctx = await resolve("::ffff:10.1.2.3", [("X-Forwarded-For", "198.51.100.4")])
    assert ctx.client.ip == ip("198.51.100.4")


async def test_one_trusted_proxy() -> None:
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "198.51.100.4")])
    assert ctx.client.ip == ip("198.51.100.4")
    assert ctx.client.forwarded_chain == ("198.51.100.4",)


async def test_two_trusted_proxies() -> None:
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "198.51.100.4, 192.168.1.10")])
    assert ctx.client.ip == ip("198.51.100.4")


async def test_spoofed_left_entries_are_skipped() -> None:
    # The client claims to be 1.1.1.1; our proxy appended the real address on the right.
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "1.1.1.1, 10.9.9.9, 198.51.100.4")])
    assert ctx.client.ip == ip("198.51.100.4")


async def test_spoofed_xff_from_untrusted_peer_is_ignored() -> None:
    ctx = await resolve("203.0.113.9", [("X-Forwarded-For", "1.1.1.1"), ("Forwarded", "for=1.1.1.1")])
    assert ctx.client.ip == ip("203.0.113.9") and ctx.client.forwarded_chain == ()


async def test_multiple_header_instances_are_joined_in_order() -> None:
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "1.1.1.1"),
                                     ("X-Forwarded-For", "198.51.100.4, 10.0.0.7")])
    assert ctx.client.ip == ip("198.51.100.4")


async def test_all_hops_trusted_gives_leftmost() -> None:
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "192.168.3.3, 10.0.0.5")])
    assert ctx.client.ip == ip("192.168.3.3")


async def test_ports_brackets_and_mapped_forms_in_xff() -> None:
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "[2002:c633:6404::1]:5555, 10.0.0.3:80")])
    assert ctx.client.ip == ip("198.51.100.4")  # 6to4 of 198.51.100.4, normalised


@pytest.mark.parametrize("value", [
    "garbage", "1.2.3.4, not-an-ip", "198.51.100.4, ,", "unknown", "\x00\x01", "1.2.3.4;5.6.7.8",
    "[::1", "999.999.999.999", ",,,,,,,", "",
])
async def test_garbage_falls_back_to_peer(value: str) -> None:
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", value)])
    assert ctx.client.ip == ip("10.0.0.2")


async def test_thousands_of_entries_are_bounded_and_still_correct() -> None:
    padding = ", ".join(f"10.{i % 250}.{i // 250 % 250}.1" for i in range(5000))
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", f"{padding}, 198.51.100.4, 10.0.0.9")])
    assert ctx.client.ip == ip("198.51.100.4")
    assert len(ctx.client.forwarded_chain) <= 32


async def test_too_many_trusted_hops_stops_at_the_cap() -> None:
    stage = ClientIpStage(PROXIES, max_entries=4)
    chain = "198.51.100.4, " + ", ".join(["10.0.0.1"] * 10)
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", chain)], stage)
    assert ctx.client.ip == ip("10.0.0.1")  # never looks further left than max_entries hops


async def test_huge_header_bytes_are_cut_from_the_left() -> None:
    stage = ClientIpStage(PROXIES, max_header_bytes=64)
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "x" * 100_000 + ", 198.51.100.4")], stage)
    assert ctx.client.ip == ip("198.51.100.4")


async def test_remembered_hops_resolve_as_parsed_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsed hops are remembered (bounded, short hops only); a remembered hop resolves exactly
    as a freshly parsed one, garbage included."""
    import gateway.stages.client_ip as module

    monkeypatch.setattr(module, "PARSED_HOP_ENTRIES", 8)
    stage = ClientIpStage(PROXIES, headers=("x-forwarded-for", "forwarded"))
    cases = [("198.51.100.4, 10.0.0.9", "198.51.100.4"), ("[2001:db8::7]:443, 10.0.0.9", "2001:db8::7"),
             ("unknown, 10.0.0.9", "10.0.0.2"), ("::ffff:203.0.113.5", "203.0.113.5"),
             ("x" * 200 + ", 10.0.0.9", "10.0.0.2")]
    for _ in range(2):  # parsed, then remembered
        for chain, expected in cases:
            ctx = await resolve("10.0.0.2", [("X-Forwarded-For", chain)], stage)
            assert ctx.client.ip == ip(expected), chain
    # five short hops remembered; the 200-character one is never an address: not worth remembering
    assert len(stage._parsed) == 5
    for i in range(50):
        await resolve("10.0.0.2", [("X-Forwarded-For", f"203.0.113.{i}")], stage)
    assert len(stage._parsed) <= 8
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "203.0.113.49")], stage)
    assert ctx.client.ip == ip("203.0.113.49")


async def test_no_peer_means_no_ip() -> None:
    ctx = await resolve(None, [("X-Forwarded-For", "1.1.1.1")])
    assert ctx.client.ip is None


@pytest.mark.parametrize("value, expected", [
    ("for=198.51.100.4", "198.51.100.4"),
    ('for="198.51.100.4:4711"', "198.51.100.4"),
    ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17"),
    ('For="[2001:db8:cafe::17]"', "2001:db8:cafe::17"),
    ("for=198.51.100.4;proto=https;by=10.0.0.2", "198.51.100.4"),
    ("proto=https;for=198.51.100.4", "198.51.100.4"),
    ("for=1.1.1.1, for=198.51.100.4, for=10.0.0.5", "198.51.100.4"),
    ('for="_gazonk", for=198.51.100.4', "198.51.100.4"),  # obfuscated hop left of the client: fine
    ('for="1.1.1.1;evil,\\"x", for=198.51.100.4', "198.51.100.4"),  # quoted separators, escapes
    ('for="unterminated, for=198.51.100.4', "198.51.100.4"),  # broken client part on the left
    # a for= inside another parameter's quoted value (a client may influence host) is not the hop
    ('proto=https;host="a;for=198.51.100.7;b";for=198.51.100.4', "198.51.100.4"),
    (' for = 198.51.100.4 ; by=10.0.0.2', "198.51.100.4"),
])
async def test_forwarded_header_forms(value: str, expected: str) -> None:
    stage = ClientIpStage(PROXIES, headers=("forwarded",))
    ctx = await resolve("10.0.0.2", [("Forwarded", value)], stage)
    assert ctx.client.ip == ip(expected)


@pytest.mark.parametrize("value", [
    "for=unknown", 'for="_hidden"', "for=198.51.100.4, for=_hidden", "proto=https", "for=", '"""""',
    'for="[2001:db8::1"', "for=198.51.100.4, by=10.0.0.1",
    'host="a;for=198.51.100.7"',  # the only for= is inside a quoted value: the hop has none
    "garbage;for=198.51.100.4",  # a pair that is not name=value: the hop is unreadable
])
async def test_forwarded_obfuscated_or_broken_falls_back_to_peer(value: str) -> None:
    stage = ClientIpStage(PROXIES, headers=("forwarded",))
    ctx = await resolve("10.0.0.2", [("Forwarded", value)], stage)
    assert ctx.client.ip == ip("10.0.0.2")


async def test_quote_storm_is_bounded() -> None:
    stage = ClientIpStage(PROXIES, headers=("forwarded",))
    ctx = await resolve("10.0.0.2", [("Forwarded", '",' * 4000 + "for=198.51.100.4")], stage)
    assert ctx.client.ip is not None  # bounded work, some answer, no exception


async def test_only_configured_header_is_trusted() -> None:
    # Default: X-Forwarded-For only. A Forwarded header the proxy passes through is ignored.
    stage = ClientIpStage(PROXIES)
    ctx = await resolve("10.0.0.2", [("Forwarded", "for=1.1.1.1"), ("X-Forwarded-For", "198.51.100.4")],
                        stage)
    assert ctx.client.ip == ip("198.51.100.4")
    ctx = await resolve("10.0.0.2", [("Forwarded", "for=1.1.1.1")], stage)
    assert ctx.client.ip == ip("10.0.0.2")


async def test_plain_mapping_headers_work() -> None:
    view = RequestView(api=ApiFamily.OPENAI, route="r", path="/", method="POST",
                       headers={"x-forwarded-for": "198.51.100.4"})
    ctx = RequestContext(request_id="r", request=view)
    ctx.client.peer_ip = ip("10.0.0.2")
    await ClientIpStage(PROXIES)(ctx)
    assert ctx.client.ip == ip("198.51.100.4")


# ---- config -----------------------------------------------------------------------------------
def test_config_parses() -> None:
    cfg, issues = parse("client_ip:\n  trusted_proxies: [10.0.0.0/8, '::1']\n  headers: [Forwarded]\n"
                        "  max_entries: 8\n")
    issues.raise_if_errors()
    assert ip("10.2.3.4") in cfg.trusted_proxies and ip("::1") in cfg.trusted_proxies
    assert cfg.headers == ("forwarded",) and cfg.max_entries == 8
    stage = ClientIpStage.from_config(cfg)
    assert stage is not None


def test_config_errors_are_positioned() -> None:
    _, issues = parse("client_ip:\n  trusted_proxies: [10.0.0.1/8, banana]\n  headers: [x-real-ip]\n"
                      "  max_entries: 0\n  trusted_proxy: []\n")
    with pytest.raises(ConfigError) as err:
        issues.raise_if_errors()
    text = str(err.value)
    assert "gw.yaml:2:21: client_ip.trusted_proxies[0]: '10.0.0.1/8' has host bits set" in text
    assert "gw.yaml:2:33: client_ip.trusted_proxies[1]: 'banana' is not an IP address or CIDR" in text
    assert "gw.yaml:3:13: client_ip.headers[0]: unsupported header 'x-real-ip'" in text
    assert "client_ip.max_entries: expected an integer from 1 to 1024" in text
    assert "unknown key 'trusted_proxy'; did you mean 'trusted_proxies'?" in text
