"""Checks that an MMDB file is sound before it replaces a database in use.

Opening a MaxMind database reads only its metadata: a file whose search tree or data section is
damaged opens fine and then fails every lookup it reaches. The Python reader has no full verify
(the Go reader's ``Verify`` and libmaxminddb's ``mmdbverify`` do), so this does the parts that are
cheap and catch real damage, bounded in time because it runs on every reload:

1. structure: record size, node count, the tree fitting the file, the 16-byte all-zero separator
   between tree and data section;
2. the data section decoded value by value from its first byte (as the Go verifier does), which
   must end exactly where the metadata begins. A large data section (City, Enterprise) is cut
   off at the time budget; the result says how far it got. This runs before any lookup because
   it is pure Python: libmaxminddb, behind the lookups, can crash the process (SIGSEGV) on
   damaged data that this decoder reports as an error;
3. lookups at addresses spread across the IPv4 and IPv6 space through libmaxminddb, so the tree
   walk and pointer resolution run on real paths, and for a sample of the addresses found,
   through the geoip2 reader call the gateway will use, so its models are built too.

Blocking and CPU-bound: run it in a worker thread, as database loading already is.
"""

from __future__ import annotations

import functools
import ipaddress
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geoip2.errors
import maxminddb
from maxminddb.decoder import Decoder
from maxminddb.errors import InvalidDatabaseError

from gateway.context import IPAddress

_METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"
_METADATA_WINDOW = 128 * 1024  # the spec's bound on how far from the end the metadata starts
_SEPARATOR = b"\x00" * 16
_PROBES = 2048  # tree lookups per address family: ~3 ms for both through libmaxminddb
# Of the addresses found, how many also go through the geoip2 call: it builds a model object and
# raises (a traceback) on a miss, ~10x the cost of a bare lookup; 2 x 2048 of those took ~40 ms
# per database, too much for a test suite that starts many gateways with three databases each.
_MODEL_PROBES = 64
# Knuth's multiplicative constant spreads the low bits of each probe so that consecutive probes do
# not all take the leftmost path below their stride.
_SPREAD = 2654435761
DEFAULT_BUDGET = 1.0  # seconds of data-section decoding per file; the rest of the checks are fixed-cost
# What damaged bytes surface as, from the decoders or from geoip2 building a model of a record of
# the wrong shape (e.g. UnicodeDecodeError from a cut string, TypeError from a list where a map was).
DAMAGE_ERRORS: tuple[type[Exception], ...] = (
    InvalidDatabaseError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error,
    RecursionError)


class DatabaseDamaged(Exception):
    """The file is not a sound MaxMind database; the message says where it broke."""


@dataclass(frozen=True, slots=True)
class Verification:
    """How much of a database was checked: ``complete`` when the whole data section decoded."""

    probes: int
    data_bytes: int
    decoded_bytes: int
    file_id: tuple[int, int, int]  # inode, size, mtime_ns of the file that was checked

    @property
    def complete(self) -> bool:
        return self.decoded_bytes >= self.data_bytes

    def describe(self) -> str:
        if self.complete:
            return "complete"
        share = 100 * self.decoded_bytes // max(self.data_bytes, 1)
        return f"partial: {share}% of the data section decoded within the time budget"


def verify_database(path: Path, lookup: Callable[[IPAddress], Any], *, budget: float = DEFAULT_BUDGET,
                    clock: Callable[[], float] = time.monotonic) -> Verification:
    """Raise DatabaseDamaged if ``path`` is unsound; ``lookup`` is the geoip2 reader call in use."""
    with open(path, "rb") as file:
        st = os.fstat(file.fileno())
        try:
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise DatabaseDamaged(f"cannot map the file: {exc}") from exc
    try:
        data_start, data_end, ip_version = _structure(buffer)
        decoded = _decode_data_section(buffer, data_start, data_end, clock() + budget, clock)
    finally:
        buffer.close()
    probes = _probe(path, lookup, ip_version)
    return Verification(probes, data_end - data_start, decoded, (st.st_ino, st.st_size, st.st_mtime_ns))


def _structure(buffer: mmap.mmap) -> tuple[int, int, int]:
    size = len(buffer)
    marker = buffer.rfind(_METADATA_MARKER, max(0, size - _METADATA_WINDOW))
    if marker < 0:
        raise DatabaseDamaged("no metadata marker")
    meta_start = marker + len(_METADATA_MARKER)
    try:
        meta, _ = Decoder(buffer, meta_start).decode(meta_start)
    except DAMAGE_ERRORS as exc:
        raise DatabaseDamaged(f"metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise DatabaseDamaged("metadata is not a map")
    node_count, record_size = meta.get("node_count"), meta.get("record_size")
    ip_version = meta.get("ip_version")
    if record_size not in (24, 28, 32) or not isinstance(node_count, int) or node_count < 0:
        raise DatabaseDamaged(f"metadata: record_size {record_size!r}, node_count {node_count!r}")
    if ip_version not in (4, 6):
        raise DatabaseDamaged(f"metadata: ip_version {ip_version!r}")
    tree_size = int(node_count) * int(record_size) // 4  # two records per node
    data_start = tree_size + len(_SEPARATOR)
    if data_start > marker:
        raise DatabaseDamaged(f"the search tree ({tree_size} bytes) runs into the metadata at {marker}")
    if buffer[tree_size:data_start] != _SEPARATOR:
        raise DatabaseDamaged(f"the data section separator at byte {tree_size} is not zero")
    return data_start, marker, int(ip_version)


@functools.cache  # the same constant tuple for every file: building 4096 addresses costs ~2 ms
def _probe_addresses(ip_version: int) -> tuple[IPAddress, ...]:
    step4 = 1 << 21  # 2048 probes over 2^32
    addresses: list[IPAddress] = [ipaddress.IPv4Address(i * step4 + (i * _SPREAD) % step4)
                                  for i in range(_PROBES)]
    if ip_version == 6:
        # 2000::/3 holds every global unicast allocation; 2048 probes step through it by /14.
        step6 = 1 << 114
        base = 0x2000 << 112
        addresses += [ipaddress.IPv6Address(base + i * step6 + (i * _SPREAD) % step6) for i in range(_PROBES)]
    return tuple(addresses)


def _probe(path: Path, lookup: Callable[[IPAddress], Any], ip_version: int) -> int:
    addresses = _probe_addresses(ip_version)
    found: list[IPAddress] = []
    try:
        tree = maxminddb.open_database(str(path))
    except DAMAGE_ERRORS as exc:
        raise DatabaseDamaged(f"cannot open: {exc}") from exc
    with tree:
        for address in addresses:
            try:
                record, _ = tree.get_with_prefix_len(address)
            except DAMAGE_ERRORS as exc:
                raise DatabaseDamaged(f"lookup of {address} failed: {exc}") from exc
            if record is not None:
                found.append(address)
    # An even sample of the addresses found, so the models come from records across the file.
    for address in found[::max(1, len(found) // _MODEL_PROBES)][:_MODEL_PROBES]:
        try:
            lookup(address)
        except geoip2.errors.AddressNotFoundError:
            continue
        except DAMAGE_ERRORS as exc:
            raise DatabaseDamaged(f"lookup of {address} failed: {exc}") from exc
    return len(addresses)


def _decode_data_section(buffer: mmap.mmap, start: int, end: int, deadline: float,
                         clock: Callable[[], float]) -> int:
    """Decode consecutive values from ``start``; returns the bytes covered (== end - start when done)."""
    decoder = Decoder(buffer, start)
    offset = start
    values = 0
    while offset < end:
        try:
            _, following = decoder.decode(offset)
        except DAMAGE_ERRORS as exc:
            raise DatabaseDamaged(f"data section at byte {offset - start}: {exc}") from exc
        if following <= offset or following > end:
            raise DatabaseDamaged(f"data section at byte {offset - start}: a value runs past its end")
        offset = following
        values += 1
        if values % 256 == 0 and clock() > deadline:
            break
    return offset - start
