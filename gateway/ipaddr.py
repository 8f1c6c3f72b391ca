"""Address normalisation and compiled CIDR sets.

Every address is normalised before it is used as a lookup key, a quota key or a policy operand:
an IPv4 client reaching us through IPv4-mapped, IPv4-compatible, NAT64 (the well-known prefix
``64:ff9b::/96`` of RFC 6052, which an IPv6-only network's translator puts in front of every IPv4
client), 6to4 or Teredo IPv6 forms must look exactly like the same client over IPv4, or a region
rule could be evaded by rewriting the address. Zone ids (``fe80::1%eth0``) are dropped: they name
a local interface, not a host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.context import IPAddress

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address

# Longest textual address we ever parse: a full IPv6 with an embedded IPv4 tail and a zone id
# is well under this; anything longer is garbage and is refused before ipaddress sees it.
MAX_ADDRESS_CHARS = 64

_V4_MASK = 0xFFFF_FFFF
_MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96
_NAT64_PREFIX = 0x0064_FF9B_0000_0000_0000_0000  # 64:ff9b::/96 (top 96 bits)
_TEREDO_PREFIX = 0x2001_0000  # 2001:0000::/32 (top 32 bits)
_6TO4_PREFIX = 0x2002  # 2002::/16 (top 16 bits)


def normalize(ip: IPAddress) -> IPAddress:
    """Return the IPv4 address embedded in ``ip`` if it carries one, else ``ip`` without zone id.

    Bit arithmetic on the integer value rather than ``ipaddress`` properties: this runs once per
    request and the properties each build intermediate network objects.
    """
    if isinstance(ip, IPv4):
        return ip
    value = int(ip)
    top96 = value >> 32
    if top96 == 0xFFFF:  # IPv4-mapped ::ffff:a.b.c.d
        return IPv4(value & _V4_MASK)
    if top96 == 0 and value > 1:  # IPv4-compatible ::a.b.c.d (deprecated); not :: or ::1
        return IPv4(value)
    if top96 == _NAT64_PREFIX:  # NAT64 well-known prefix: 64:ff9b::a.b.c.d
        return IPv4(value & _V4_MASK)
    top32 = value >> 96
    if top32 == _TEREDO_PREFIX:  # Teredo: client IPv4 is the bit-inverted low 32 bits
        return IPv4(~value & _V4_MASK)
    if top32 >> 16 == _6TO4_PREFIX:  # 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD
        return IPv4((value >> 80) & _V4_MASK)
    if ip.scope_id is not None:
        return IPv6(value)
    return ip


def parse_ip(text: str) -> IPAddress | None:
    """Parse one bare address (no port, no brackets), drop a zone id, normalise; None if invalid."""
    if not text or len(text) > MAX_ADDRESS_CHARS:
        return None
    zone = text.find("%")
    if zone >= 0:
        text = text[:zone]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return normalize(ip)


def parse_host(text: str) -> IPAddress | None:
    """Parse an address as proxies write it: optional quotes, ``[v6]``, ``[v6]:port``, ``v4:port``."""
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    if not text or len(text) > MAX_ADDRESS_CHARS + 8:
        return None
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1:]
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        return parse_ip(text[1:end])
    colon = text.find(":")
    # Exactly one colon means v4:port; more than one is a bare IPv6 address.
    if colon >= 0 and text.find(":", colon + 1) < 0:
        if not text[colon + 1:].isdigit():
            return None
        text = text[:colon]
    return parse_ip(text)


@dataclass(frozen=True, slots=True)
class CidrSet:
    """An immutable set of networks with O(number of distinct prefix lengths) membership.

    Networks are stored per prefix length as sets of masked integers, so a lookup is a handful
    of shifts and hash probes whatever the number of networks. IPv4-mapped IPv6 networks are
    stored as IPv4 so they match normalised addresses. Callers pass normalised addresses.
    """

    v4: tuple[tuple[int, frozenset[int]], ...] = ()
    v6: tuple[tuple[int, frozenset[int]], ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, items: Iterable[str]) -> CidrSet:
        """Compile CIDR strings (a bare address means a single host). Raises ValueError on the
        first invalid entry, naming it; use :func:`parse_network` to validate entry by entry."""
        return cls.from_networks(parse_network(item) for item in items)

    @classmethod
    def from_networks(cls, nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> CidrSet:
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for net in nets:
            net = _unmap_network(net)
            if isinstance(net, ipaddress.IPv4Network):
                v4.append(net)
            else:
                v6.append(net)
        c4 = list(ipaddress.collapse_addresses(v4))
        c6 = list(ipaddress.collapse_addresses(v6))
        return cls(_index(c4, 32), _index(c6, 128), (*c4, *c6))

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, IPv4):
            table, bits = self.v4, 32
        elif isinstance(ip, IPv6):
            table, bits = self.v6, 128
        else:
            return False
        value = int(ip)
        for prefix, masked in table:
            if value >> (bits - prefix) in masked:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __len__(self) -> int:
        return len(self.networks)


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse one CIDR; host bits set is an error (``10.0.0.1/8`` is almost always a typo)."""
    raw = text.strip() if isinstance(text, str) else text
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"expected an address or CIDR, got {text!r}")
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise ValueError(f"'{raw}' is not an IP address or CIDR") from exc
        raise ValueError(f"'{raw}' has host bits set; did you mean '{loose}'?") from exc


def _unmap_network(
    net: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        base = int(net.network_address)
        if base >> 32 == 0xFFFF:
            return ipaddress.IPv4Network((base & _V4_MASK, net.prefixlen - 96))
    return net


def _index(
    nets: list[ipaddress.IPv4Network] | list[ipaddress.IPv6Network], bits: int,
) -> tuple[tuple[int, frozenset[int]], ...]:
    by_prefix: dict[int, set[int]] = {}
    for net in nets:
        by_prefix.setdefault(net.prefixlen, set()).add(int(net.network_address) >> (bits - net.prefixlen))
    # Shortest prefixes first: broad ranges (10.0.0.0/8) are the common case for proxies.
    return tuple((p, frozenset(v)) for p, v in sorted(by_prefix.items()))
