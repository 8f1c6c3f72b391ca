"""Address normalisation and compiled CIDR sets.

Every address is normalised before it is used as a lookup key, a quota key or a policy operand:
an IPv4 client reaching us through IPv4-mapped, IPv4-compatible, NAT64 (the well-known prefix
``64:ff9b::/96`` of RFC 6052, which an IPv6-only network's translator puts in front of every IPv4
client), 6to4 or Teredo IPv6 forms must look exactly like the same client over IPv4, or a region
rule could be evaded by rewriting the address. Zone ids (``fe80::1%eth0``) are dropped: they name
a local interface, not a host.

Local-use NAT64 prefixes (RFC 8215's ``64:ff9b:1::/48``, or any Network-Specific Prefix of RFC
6052 §2.2) are decoded only when the operator lists them (:class:`Nat64Prefixes`, from
``client_ip.nat64_prefixes``): whether such a range is a translator's is a fact about one network,
and decoding a range that is not would turn real IPv6 clients into made-up IPv4 ones.

IPv4-compatible addresses (``::a.b.c.d``, deprecated by RFC 4291) are decoded because MaxMind
databases store IPv4 data under ``::/96``: the GeoIP lookup already answers ``::a.b.c.d`` as
``a.b.c.d``, so the policy must see the same address or a CIDR rule and the country would disagree.
``::/104`` (``::``, ``::1`` and every ``::0.x.x.x``, i.e. IPv4's never-routed ``0.0.0.0/8``) stays
IPv6: those are the unspecified and loopback addresses or small IPv6 tokens, never an IPv4 client,
and MaxMind has no data there either way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.context import IPAddress

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Longest textual address we ever parse: a full IPv6 with an embedded IPv4 tail and a zone id
# is well under this; anything longer is garbage and is refused before ipaddress sees it.
MAX_ADDRESS_CHARS = 64

_V4_MASK = 0xFFFF_FFFF
_MAPPED_PREFIX = 0xFFFF << 32  # ::ffff:0:0/96
_NAT64_PREFIX = 0x0064_FF9B_0000_0000_0000_0000  # 64:ff9b::/96 (top 96 bits)
_TEREDO_PREFIX = 0x2001_0000  # 2001:0000::/32 (top 32 bits)
_6TO4_PREFIX = 0x2002  # 2002::/16 (top 16 bits)
# ::a.b.c.d with a.b.c.d outside 0.0.0.0/8, i.e. not in ::/104: see the module docstring.
_COMPAT_MIN = 1 << 24

# Network-Specific Prefix lengths RFC 6052 §2.2 defines a layout for.
NAT64_PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)
# What the gateway decodes whatever the configuration: a configured NAT64 prefix may not overlap
# these (each address must have one reading).
BUILTIN_IPV4_CARRIERS: tuple[tuple[str, ipaddress.IPv6Network], ...] = (
    ("the IPv4-compatible range", ipaddress.IPv6Network("::/96")),
    ("the IPv4-mapped range", ipaddress.IPv6Network("::ffff:0:0/96")),
    ("the NAT64 well-known prefix", ipaddress.IPv6Network("64:ff9b::/96")),
    ("Teredo", ipaddress.IPv6Network("2001::/32")),
    ("6to4", ipaddress.IPv6Network("2002::/16")),
)
# IPv6 ranges whose last 32 bits are the IPv4 client once normalised: a CIDR inside one is
# compared as the IPv4 network it carries (see :func:`matched_networks`).
_IPV4_TAIL_PREFIXES = (
    ipaddress.IPv6Network("::ffff:0:0/96"), ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::/96"),
)
_COMPAT_KEPT = ipaddress.IPv6Network("::/104")  # never decoded (see the module docstring)
# Where the IPv4 client sits elsewhere (6to4 right after 2002::/16, Teredo inverted in the last 32
# bits beside a server address) a CIDR is not converted: wholly inside one it can never match a
# normalised address.
_IPV4_CARRIERS = (
    ("6to4", ipaddress.IPv6Network("2002::/16")), ("Teredo", ipaddress.IPv6Network("2001::/32")),
)


@dataclass(frozen=True, slots=True)
class Nat64Prefixes:
    """Operator-listed NAT64 Network-Specific Prefixes, decoded per RFC 6052 §2.2.

    The IPv4 address fills the 32 bits after the prefix, except that bits 64-71 (the "u" octet)
    are skipped: a /40 keeps 24 bits before it and 8 after, a /48 16 and 16, a /56 8 and 24, a /64
    puts all 32 after it, a /96 ends the address with them. The u octet and the suffix are ignored
    when decoding (RFC 6052 wants them zero, but a translator's range holds nothing but IPv4
    representations, so any value there still stands for that IPv4 client). Callers validate the
    lengths (:data:`NAT64_PREFIX_LENGTHS`) and overlaps; see :func:`nat64_prefix_problem`.
    """

    networks: tuple[ipaddress.IPv6Network, ...] = ()
    # Per prefix: (shift, prefix bits, high mask, low shift, low mask, low bits), precomputed so a
    # decode is shifts and masks on the int already in hand.
    _table: tuple[tuple[int, int, int, int, int, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = []
        for net in self.networks:
            length = net.prefixlen
            if length not in NAT64_PREFIX_LENGTHS:
                raise ValueError(f"NAT64 prefix length must be one of {NAT64_PREFIX_LENGTHS}, got {net}")
            shift = 128 - length
            if length == 96:
                table.append((shift, int(net.network_address) >> shift, 0, 0, _V4_MASK, 0))
                continue
            high = 64 - length  # IPv4 bits before the u octet (bits length..63)
            low = 32 - high  # IPv4 bits after it (from bit 72 on)
            table.append((shift, int(net.network_address) >> shift, (1 << high) - 1,
                          128 - 72 - low, (1 << low) - 1, low))
        object.__setattr__(self, "_table", tuple(table))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def decode(self, value: int) -> IPv4 | None:
        """The IPv4 address ``value`` (an IPv6 address as an int) embeds, if it lies in a prefix."""
        for shift, prefix, high_mask, low_shift, low_mask, low_bits in self._table:
            if value >> shift == prefix:
                return IPv4((value >> 64 & high_mask) << low_bits | (value >> low_shift & low_mask))
        return None

    def containing(self, net: Network) -> ipaddress.IPv6Network | None:
        """The configured prefix ``net`` lies wholly inside, if any."""
        if isinstance(net, ipaddress.IPv6Network):
            for prefix in self.networks:
                if net.subnet_of(prefix):
                    return prefix
        return None


def nat64_prefix_problem(net: Network, others: Iterable[ipaddress.IPv6Network] = ()) -> str | None:
    """Why ``net`` cannot be a configured NAT64 prefix (None when it can); ``others`` are the
    prefixes accepted before it."""
    if not isinstance(net, ipaddress.IPv6Network):
        return f"'{net}' is not an IPv6 prefix, expected a NAT64 prefix such as 64:ff9b:1::/48"
    if net.prefixlen not in NAT64_PREFIX_LENGTHS:
        lengths = ", ".join(f"/{n}" for n in NAT64_PREFIX_LENGTHS)
        return f"'{net}' is a /{net.prefixlen}, expected a NAT64 prefix length of {lengths} (RFC 6052)"
    if net.prefixlen == 96 and (int(net.network_address) >> 56) & 0xFF:
        return (f"'{net}' sets bits 64-71, which RFC 6052 reserves (they must be zero), "
                "expected a /96 made of a /64 and four zero octets")
    for name, carrier in BUILTIN_IPV4_CARRIERS:
        if net.overlaps(carrier):
            return f"'{net}' overlaps {name} {carrier}, which is always decoded, expected a prefix outside it"
    for other in others:
        if net.overlaps(other):
            return f"'{net}' overlaps the NAT64 prefix {other} listed before it, expected disjoint prefixes"
    return None


def normalize(ip: IPAddress, nat64: Nat64Prefixes | None = None) -> IPAddress:
    """Return the IPv4 address embedded in ``ip`` if it carries one, else ``ip`` without zone id.

    ``nat64``: the operator's local NAT64 prefixes, decoded too. Bit arithmetic on the integer
    value rather than ``ipaddress`` properties: this runs once per request and the properties each
    build intermediate network objects.
    """
    if isinstance(ip, IPv4):
        return ip
    value = int(ip)
    top96 = value >> 32
    if top96 == 0xFFFF:  # IPv4-mapped ::ffff:a.b.c.d
        return IPv4(value & _V4_MASK)
    if top96 == 0 and value >= _COMPAT_MIN:  # IPv4-compatible ::a.b.c.d; not ::/104 (:: or ::1)
        return IPv4(value)
    if top96 == _NAT64_PREFIX:  # NAT64 well-known prefix: 64:ff9b::a.b.c.d
        return IPv4(value & _V4_MASK)
    top32 = value >> 96
    if top32 == _TEREDO_PREFIX:  # Teredo: client IPv4 is the bit-inverted low 32 bits
        return IPv4(~value & _V4_MASK)
    if top32 >> 16 == _6TO4_PREFIX:  # 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD
        return IPv4((value >> 80) & _V4_MASK)
    if nat64 is not None:
        embedded = nat64.decode(value)
        if embedded is not None:
            return embedded
    if ip.scope_id is not None:
        return IPv6(value)
    return ip


def matched_networks(net: Network, nat64: Nat64Prefixes | None = None) -> tuple[Network, ...]:
    """``net`` as the addresses it holds look once normalised, for comparing with normalised
    addresses: inside a range whose last 32 bits are the IPv4 client (IPv4-mapped, the NAT64
    well-known prefix, IPv4-compatible, a configured /96 NAT64 prefix) it is the IPv4 network it
    carries, or ``::ffff:192.0.2.0/120`` would never match 192.0.2.7. A CIDR spanning ``::/104``
    keeps that part as IPv6, since those addresses are never decoded (``::1/128`` still matches
    ``::1``)."""
    if not isinstance(net, ipaddress.IPv6Network) or net.prefixlen < 96:
        return (net,)
    tails: tuple[ipaddress.IPv6Network, ...] = _IPV4_TAIL_PREFIXES
    if nat64 is not None:
        tails += tuple(p for p in nat64.networks if p.prefixlen == 96)
    for prefix in tails:
        if not net.subnet_of(prefix):
            continue
        if net.subnet_of(_COMPAT_KEPT):
            return (net,)
        v4 = ipaddress.IPv4Network((int(net.network_address) & _V4_MASK, net.prefixlen - 96))
        if _COMPAT_KEPT.subnet_of(net):
            return (v4, _COMPAT_KEPT)
        return (v4,)
    return (net,)


def unmatchable_reason(net: Network, nat64: Nat64Prefixes | None = None) -> str | None:
    """Where ``net`` lies wholly inside a range every address of which normalises to an IPv4
    address somewhere other than its last 32 bits (6to4, Teredo, a configured NAT64 prefix shorter
    than /96): such a CIDR never matches a normalised address. Names the range, else None."""
    if not isinstance(net, ipaddress.IPv6Network):
        return None
    for name, prefix in _IPV4_CARRIERS:
        if net.subnet_of(prefix):
            return f"{name} space"
    local = nat64.containing(net) if nat64 is not None else None
    if local is not None and local.prefixlen != 96:
        return f"the NAT64 prefix {local} (client_ip.nat64_prefixes)"
    return None


@dataclass(frozen=True, slots=True)
class CarriedIpv4:
    """An IPv6 network written in a form the gateway decodes to IPv4 (see :func:`carried_ipv4`)."""

    form: str  # "NAT64", "IPv4-compatible", "6to4", "Teredo", or a configured NAT64 prefix
    # What the addresses it holds look like once normalised; () when no network can say it (a
    # Teredo range shorter than /96, most ranges inside a configured prefix shorter than /96).
    networks: tuple[Network, ...]


def carried_ipv4(net: Network, nat64: Nat64Prefixes | None = None) -> CarriedIpv4 | None:
    """Where (part of) ``net`` is a form that :func:`normalize` turns into IPv4, other than
    IPv4-mapped (which :class:`CidrSet` stores as IPv4 already): the form and, when they can be
    told, the networks the normalised addresses fall in. None for a plain network, and for one
    that merely contains such a range beside real IPv6 space (``2000::/3``).

    For callers that compare a configured network with normalised addresses *without* converting
    it (``client_ip.trusted_proxies``): such an entry (or that part of it) can never match.
    Converting it instead would be a silent, security-relevant reading of what was written
    (``64:ff9b::/96`` would trust every IPv4 peer), so callers refuse it and name the networks.
    """
    if not isinstance(net, ipaddress.IPv6Network) or net.subnet_of(_IPV4_TAIL_PREFIXES[0]):
        return None  # IPv4 already, or IPv4-mapped: converted where it is compiled
    base, length = int(net.network_address), net.prefixlen
    local = nat64.containing(net) if nat64 is not None else None
    local_form = f"NAT64 ({local}, client_ip.nat64_prefixes)"
    matched = matched_networks(net, nat64)
    if matched != (net,):  # inside a range whose last 32 bits are the IPv4 address
        top96 = base >> 32
        form = "NAT64" if top96 == _NAT64_PREFIX else "IPv4-compatible" if top96 == 0 else local_form
        return CarriedIpv4(form, matched)
    if unmatchable_reason(net, nat64) is None:
        return None
    if net.subnet_of(_IPV4_CARRIERS[0][1]):  # 6to4: the IPv4 address is bits 16-47
        return CarriedIpv4("6to4", (ipaddress.IPv4Network(((base >> 80) & _V4_MASK, min(32, length - 16))),))
    if net.subnet_of(_IPV4_CARRIERS[1][1]):  # Teredo: the client is the inverted last 32 bits
        if length < 96:
            return CarriedIpv4("Teredo", ())  # every client of some server: no network says it
        host_bits = 128 - length
        v4 = ipaddress.IPv4Network(((~base & _V4_MASK) >> host_bits << host_bits, length - 96))
        return CarriedIpv4("Teredo", (v4,))
    embedded = nat64.decode(base) if nat64 is not None and length == 128 else None
    return CarriedIpv4(local_form, (ipaddress.IPv4Network(embedded),) if embedded is not None else ())


def parse_ip(text: str, nat64: Nat64Prefixes | None = None) -> IPAddress | None:
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
    return normalize(ip, nat64)


def parse_host(text: str, nat64: Nat64Prefixes | None = None) -> IPAddress | None:
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
        return parse_ip(text[1:end], nat64)
    colon = text.find(":")
    # Exactly one colon means v4:port; more than one is a bare IPv6 address.
    if colon >= 0 and text.find(":", colon + 1) < 0:
        if not text[colon + 1:].isdigit():
            return None
        text = text[:colon]
    return parse_ip(text, nat64)


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
