"""Addresses that carry an IPv4 client inside IPv6: local NAT64 prefixes (RFC 6052 layouts,
``client_ip.nat64_prefixes``) and ``trusted_proxies`` entries written in such a form (refused)."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.ipaddr import (
    Nat64Prefixes,
    carried_ipv4,
    matched_networks,
    normalize,
    parse_host,
    parse_ip,
    unmatchable_reason,
)
from gateway.stages.client_ip import ClientIpStage
from gateway.yamlsource import ConfigError
from tests.support.client_ip import PROXIES, ip, parse, resolve


# ---- local NAT64 prefixes (RFC 6052 §2.2, RFC 8215) ----------------------------------------------
def nat64(*prefixes: str) -> Nat64Prefixes:
    return Nat64Prefixes(tuple(ipaddress.IPv6Network(p) for p in prefixes))


# RFC 6052 §2.4, the example table: 192.0.2.33 under each Network-Specific Prefix length.
RFC6052_EXAMPLES = [
    ("2001:db8::/32", "2001:db8:c000:221::"),
    ("2001:db8:100::/40", "2001:db8:1c0:2:21::"),
    ("2001:db8:122::/48", "2001:db8:122:c000:2:2100::"),
    ("2001:db8:122:300::/56", "2001:db8:122:3c0:0:221::"),
    ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:2100:0"),
    ("2001:db8:122:344::/96", "2001:db8:122:344::192.0.2.33"),
]


@pytest.mark.parametrize("prefix, embedded", RFC6052_EXAMPLES)
def test_rfc6052_example_table_decodes_to_the_ipv4_address(prefix: str, embedded: str) -> None:
    prefixes = nat64(prefix)
    assert normalize(ip(embedded), prefixes) == ip("192.0.2.33")
    assert parse_ip(embedded, prefixes) == ip("192.0.2.33")
    assert parse_host(f"[{embedded}]:443", prefixes) == ip("192.0.2.33")
    # Not decoded unless the operator lists the prefix: 2001:db8:: is no translator elsewhere.
    assert normalize(ip(embedded)) == ip(embedded)


@pytest.mark.parametrize("prefix, embedded", RFC6052_EXAMPLES)
def test_rfc6052_layout_places_every_bit(prefix: str, embedded: str) -> None:
    """Each IPv4 bit lands where §2.2 puts it: flipping any one bit of the IPv4 address in the
    IPv6 form (skipping the u octet, bits 64-71) flips the same bit of the decoded address."""
    net = ipaddress.IPv6Network(prefix)
    base = int(ip(embedded))
    positions = [b for b in range(net.prefixlen, 128) if not 64 <= b <= 71][:32]  # from the top
    prefixes = nat64(prefix)
    for i, bit in enumerate(positions):
        flipped = ipaddress.IPv6Address(base ^ (1 << (127 - bit)))
        assert normalize(flipped, prefixes) == ipaddress.IPv4Address(int(ip("192.0.2.33")) ^ (1 << (31 - i)))


@pytest.mark.parametrize("prefix, embedded, expected", [
    ("2001:db8:122:344::/64", "2001:db8:122:344:ffc0:2:2100:0", "192.0.2.33"),  # u octet set
    ("2001:db8:122:344::/64", "2001:db8:122:344:c0:2:21ff:ffff", "192.0.2.33"),  # suffix set
    ("2001:db8::/32", "2001:db8:c000:221:ff:ffff:ffff:ffff", "192.0.2.33"),
    ("64:ff9b:1::/48", "64:ff9b:1:d8a0:53:3800::", "216.160.83.56"),  # RFC 8215 local-use prefix
])
def test_u_octet_and_suffix_are_ignored(prefix: str, embedded: str, expected: str) -> None:
    # Whatever a client sets there, it is still the IPv4 client the translator stands for.
    assert normalize(ip(embedded), nat64(prefix)) == ip(expected)


def test_addresses_outside_the_configured_prefixes_are_untouched() -> None:
    prefixes = nat64("64:ff9b:1::/48", "2001:db8:122:344::/96")
    assert normalize(ip("64:ff9b:2::c000:221"), prefixes) == ip("64:ff9b:2::c000:221")
    assert normalize(ip("2001:db8:122:345::c000:221"), prefixes) == ip("2001:db8:122:345::c000:221")
    # the built-in forms still win and an IPv4 address passes through
    assert normalize(ip("64:ff9b::c000:221"), prefixes) == ip("192.0.2.33")
    assert normalize(ip("192.0.2.33"), prefixes) == ip("192.0.2.33")
    assert not Nat64Prefixes() and bool(prefixes)


def test_nat64_prefixes_refuse_lengths_without_a_layout() -> None:
    with pytest.raises(ValueError, match="NAT64 prefix length must be one of"):
        nat64("2001:db8::/33")


@pytest.mark.parametrize("cidr, expected", [
    ("::ffff:203.0.113.0/120", ["203.0.113.0/24"]),
    ("64:ff9b::cb00:7100/120", ["203.0.113.0/24"]),
    ("::203.0.113.0/120", ["203.0.113.0/24"]),  # IPv4-compatible, as MaxMind reads ::/96
    ("::1/128", ["::1/128"]),  # ::/104 is never decoded, so it is matched as IPv6
    ("::/96", ["0.0.0.0/0", "::/104"]),
    ("2001:db8:122:344::c000:200/120", ["2001:db8:122:344::c000:200/120"]),  # not configured
    ("10.0.0.0/8", ["10.0.0.0/8"]),
])
def test_matched_networks_are_what_normalised_addresses_look_like(cidr: str, expected: list[str]) -> None:
    assert [str(n) for n in matched_networks(ipaddress.ip_network(cidr))] == expected


def test_matched_networks_convert_inside_a_configured_96_only() -> None:
    prefixes = nat64("2001:db8:122:344::/96", "64:ff9b:1::/48")
    assert matched_networks(ipaddress.ip_network("2001:db8:122:344::c000:200/120"), prefixes) == (
        ipaddress.ip_network("192.0.2.0/24"),)
    inside48 = ipaddress.ip_network("64:ff9b:1:c000::/64")
    assert matched_networks(inside48, prefixes) == (inside48,)
    reason = unmatchable_reason(inside48, prefixes)
    assert reason == "the NAT64 prefix 64:ff9b:1::/48 (client_ip.nat64_prefixes)"
    assert unmatchable_reason(inside48) is None
    assert unmatchable_reason(ipaddress.ip_network("2002:c000:200::/40")) == "6to4 space"


async def test_stage_decodes_configured_prefixes_for_peer_and_hops() -> None:
    prefixes = nat64("64:ff9b:1::/48")
    stage = ClientIpStage(PROXIES, headers=("x-forwarded-for",), nat64_prefixes=prefixes)
    ctx = await resolve("64:ff9b:1:d8a0:53:3800::", stage=stage)  # the peer itself
    assert ctx.client.ip == ip("216.160.83.56")
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "[64:ff9b:1:c000:2:2100::]:5555")], stage=stage)
    assert ctx.client.ip == ip("192.0.2.33")
    # the default stage leaves the same addresses as they are
    ctx = await resolve("10.0.0.2", [("X-Forwarded-For", "64:ff9b:1:c000:2:2100::")])
    assert ctx.client.ip == ip("64:ff9b:1:c000:2:2100::")


async def test_config_nat64_prefixes_parse_and_reach_the_stage() -> None:
    cfg, issues = parse("client_ip:\n  nat64_prefixes: [64:ff9b:1::/48, '2001:db8:122:344::/96']\n")
    issues.raise_if_errors()
    assert [str(n) for n in cfg.nat64_prefixes.networks] == ["64:ff9b:1::/48", "2001:db8:122:344::/96"]
    ctx = await resolve("2001:db8:122:344::c000:221", stage=ClientIpStage.from_config(cfg))
    assert ctx.client.ip == ip("192.0.2.33")
    default, issues = parse("client_ip:\n  trusted_proxies: []\n")
    issues.raise_if_errors()
    assert not default.nat64_prefixes
    ctx = await resolve("2001:db8:122:344::c000:221", stage=ClientIpStage.from_config(default))
    assert ctx.client.ip == ip("2001:db8:122:344::c000:221")


def test_config_nat64_prefix_errors_are_positioned() -> None:
    _, issues = parse(
        "client_ip:\n"
        "  nat64_prefixes:\n"
        "    - 64:ff9b:1::/50\n"
        "    - 192.0.2.0/24\n"
        "    - 64:ff9b:1::1/48\n"
        "    - 64:ff9b::/96\n"
        "    - 2001::/32\n"
        "    - '::/32'\n"
        "    - 2001:db8:0:0:ff00::/96\n"
        "    - 64:ff9b:1::/48\n"
        "    - 64:ff9b:1:2::/64\n"
        "    - 7\n"
    )
    with pytest.raises(ConfigError) as err:
        issues.raise_if_errors()
    assert str(err.value).splitlines() == [
        "gw.yaml:3:7: client_ip.nat64_prefixes[0]: '64:ff9b:1::/50' is a /50, expected a NAT64 prefix "
        "length of /32, /40, /48, /56, /64, /96 (RFC 6052)",
        "gw.yaml:4:7: client_ip.nat64_prefixes[1]: '192.0.2.0/24' is not an IPv6 prefix, expected a NAT64 "
        "prefix such as 64:ff9b:1::/48",
        "gw.yaml:5:7: client_ip.nat64_prefixes[2]: '64:ff9b:1::1/48' has host bits set; did you mean "
        "'64:ff9b:1::/48'?",
        "gw.yaml:6:7: client_ip.nat64_prefixes[3]: '64:ff9b::/96' overlaps the NAT64 well-known prefix "
        "64:ff9b::/96, which is always decoded, expected a prefix outside it",
        "gw.yaml:7:7: client_ip.nat64_prefixes[4]: '2001::/32' overlaps Teredo 2001::/32, which is always "
        "decoded, expected a prefix outside it",
        "gw.yaml:8:7: client_ip.nat64_prefixes[5]: '::/32' overlaps the IPv4-compatible range ::/96, which "
        "is always decoded, expected a prefix outside it",
        "gw.yaml:9:7: client_ip.nat64_prefixes[6]: '2001:db8:0:0:ff00::/96' sets bits 64-71, which RFC 6052 "
        "reserves (they must be zero), expected a /96 made of a /64 and four zero octets",
        "gw.yaml:11:7: client_ip.nat64_prefixes[8]: '64:ff9b:1:2::/64' overlaps the NAT64 prefix "
        "64:ff9b:1::/48 listed before it, expected disjoint prefixes",
        "gw.yaml:12:7: client_ip.nat64_prefixes[9]: expected a NAT64 prefix such as 64:ff9b:1::/48, got "
        "int 7",
    ]


# ---- trusted_proxies written in an IPv6 form of IPv4 ----------------------------------------------
def test_trusted_proxies_in_a_form_never_compared_are_refused_with_what_to_write() -> None:
    """The peer and the hops are normalised before they meet trusted_proxies, so an entry written
    as NAT64, IPv4-compatible, 6to4, Teredo or under a configured NAT64 prefix could never match;
    it is refused (not converted: 64:ff9b::/96 would then trust every IPv4 peer)."""
    _, issues = parse(
        "client_ip:\n"
        "  nat64_prefixes: [64:ff9b:1::/48, '2001:db8:122:344::/96']\n"
        "  trusted_proxies:\n"
        "    - 10.0.0.0/8\n"
        "    - 64:ff9b::c000:201/128\n"
        "    - 64:ff9b::c000:200/120\n"
        "    - '::c000:201'\n"
        "    - '::/96'\n"
        "    - 2002:c000:201::/48\n"
        "    - 2001:0:4136:e378:8000:63bf:3fff:fdd2/128\n"
        "    - 2001:0:4136:e378::/64\n"
        "    - 64:ff9b:1:c000:2:2100::/128\n"
        "    - 64:ff9b:1:c000::/64\n"
        "    - 2001:db8:122:344::c000:221/128\n"
        "    - 64:ff9b::/96\n"
    )
    with pytest.raises(ConfigError) as err:
        issues.raise_if_errors()
    at = "client_ip.trusted_proxies"
    never = "so it never matches"
    assert str(err.value).splitlines() == [
        f"gw.yaml:5:7: {at}[1]: '64:ff9b::c000:201/128' is the NAT64 form of 192.0.2.1, which is how the "
        f"gateway sees that peer, {never}; write 192.0.2.1/32",
        f"gw.yaml:6:7: {at}[2]: '64:ff9b::c000:200/120' is the NAT64 form of 192.0.2.0/24, which is how the "
        f"gateway sees those peers, {never} them; write 192.0.2.0/24",
        f"gw.yaml:7:7: {at}[3]: '::c000:201/128' is the IPv4-compatible form of 192.0.2.1, which is how the "
        f"gateway sees that peer, {never}; write 192.0.2.1/32",
        f"gw.yaml:8:7: {at}[4]: '::/96' is the IPv4-compatible form of 0.0.0.0/0, which is how the gateway "
        f"sees those peers, {never} them; write 0.0.0.0/0 and ::/104 (if every IPv4 peer is meant to be "
        "trusted)",
        f"gw.yaml:9:7: {at}[5]: '2002:c000:201::/48' is the 6to4 form of 192.0.2.1, which is how the gateway "
        f"sees that peer, {never}; write 192.0.2.1/32",
        f"gw.yaml:10:7: {at}[6]: '2001:0:4136:e378:8000:63bf:3fff:fdd2/128' is the Teredo form of "
        f"192.0.2.45, which is how the gateway sees that peer, {never}; write 192.0.2.45/32",
        f"gw.yaml:11:7: {at}[7]: '2001:0:4136:e378::/64' lies in Teredo space, whose peers the gateway sees "
        f"as the IPv4 address each carries, {never}; write the IPv4 addresses of those proxies",
        f"gw.yaml:12:7: {at}[8]: '64:ff9b:1:c000:2:2100::/128' is the NAT64 (64:ff9b:1::/48, "
        "client_ip.nat64_prefixes) form of 192.0.2.33, which is how the gateway sees that peer, "
        f"{never}; write 192.0.2.33/32",
        f"gw.yaml:13:7: {at}[9]: '64:ff9b:1:c000::/64' lies in NAT64 (64:ff9b:1::/48, "
        "client_ip.nat64_prefixes) space, whose peers the gateway sees as the IPv4 address each carries, "
        f"{never}; write the IPv4 addresses of those proxies",
        f"gw.yaml:14:7: {at}[10]: '2001:db8:122:344::c000:221/128' is the NAT64 (2001:db8:122:344::/96, "
        "client_ip.nat64_prefixes) form of 192.0.2.33, which is how the gateway sees that peer, "
        f"{never}; write 192.0.2.33/32",
        f"gw.yaml:15:7: {at}[11]: '64:ff9b::/96' is the NAT64 form of 0.0.0.0/0, which is how the gateway "
        f"sees those peers, {never} them; write 0.0.0.0/0 (if every IPv4 peer is meant to be trusted)",
    ]


def test_trusted_proxies_that_can_match_are_accepted() -> None:
    # IPv4-mapped entries are stored as IPv4; ::/104 stays IPv6 (::1 is matched as itself); a
    # range that merely contains a tunnel range holds real IPv6 peers too; a local-use NAT64 range
    # the operator did not list is ordinary IPv6.
    cfg, issues = parse("client_ip:\n  trusted_proxies: ['::ffff:192.0.2.0/120', '::1', 2000::/3, "
                        "64:ff9b:1::/48]\n")
    issues.raise_if_errors()
    assert [str(n) for n in cfg.trusted_proxies.networks] == [
        "192.0.2.0/24", "::1/128", "64:ff9b:1::/48", "2000::/3"]


async def test_the_ipv4_entry_the_refusal_names_trusts_that_peer_in_every_form() -> None:
    cfg, issues = parse("client_ip:\n  trusted_proxies: [192.0.2.1/32]\n")
    issues.raise_if_errors()
    stage = ClientIpStage.from_config(cfg)
    for peer in ("192.0.2.1", "64:ff9b::c000:201", "::c000:201", "2002:c000:201::1", "::ffff:192.0.2.1"):
        ctx = await resolve(peer, [("X-Forwarded-For", "203.0.113.9")], stage=stage)
        assert ctx.client.ip == ip("203.0.113.9"), peer


@pytest.mark.parametrize("cidr, form, expected", [
    ("2001:0:4136:e378:8000:63bf:3fff:fd00/120", "Teredo", ["192.0.2.0/24"]),  # inverted bits
    ("2002:c000:201:1::/64", "6to4", ["192.0.2.1/32"]),  # past the /48: still that one IPv4 peer
    ("2002::/16", "6to4", ["0.0.0.0/0"]),
    ("::/104", None, None), ("::ffff:0:0/96", None, None), ("2001:db8::/32", None, None),
])
def test_carried_ipv4_names_the_networks_normalised_peers_fall_in(
        cidr: str, form: str | None, expected: list[str] | None) -> None:
    carried = carried_ipv4(ipaddress.ip_network(cidr))
    if form is None:
        assert carried is None
    else:
        assert carried is not None and carried.form == form
        assert [str(n) for n in carried.networks] == expected
        # Every address of the range normalises into what is named.
        net = ipaddress.ip_network(cidr)
        for probe in (net.network_address, net.broadcast_address):
            assert any(normalize(probe) in n for n in carried.networks)
