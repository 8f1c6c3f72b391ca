"""A GeoProvider from an in-memory table of CIDR → record, for tests and demos."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from gateway.context import IPAddress
from gateway.geo.base import EMPTY_RECORD, GeoDatabaseInfo, GeoRecord
from gateway.ipaddr import parse_network


class StaticGeoProvider:
    """Longest-prefix match over a fixed table; IPv4-mapped networks are stored as IPv4."""

    def __init__(self, table: Mapping[str, GeoRecord]) -> None:
        by_prefix: dict[tuple[int, int], dict[int, GeoRecord]] = {}
        for cidr, record in table.items():
            net = parse_network(cidr)
            bits = net.max_prefixlen
            by_prefix.setdefault((net.version, net.prefixlen), {})[
                int(net.network_address) >> (bits - net.prefixlen)] = record
        # Longest prefix first so the most specific network wins.
        self._tables = sorted(by_prefix.items(), key=lambda kv: -kv[0][1])

    def lookup(self, ip: IPAddress) -> GeoRecord:
        bits = 32 if isinstance(ip, ipaddress.IPv4Address) else 128
        value = int(ip)
        for (version, prefix), table in self._tables:
            if version != ip.version:
                continue
            record = table.get(value >> (bits - prefix))
            if record is not None:
                return record
        return EMPTY_RECORD

    def databases(self) -> tuple[GeoDatabaseInfo, ...]:
        return (GeoDatabaseInfo(role="static", path="<memory>", database_type="static"),)

    def failing(self) -> tuple[str, ...]:
        return ()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
