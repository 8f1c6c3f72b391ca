"""Write MMDB fixtures at test time with mmdb-writer, shaped like MaxMind's own databases.

geoip2 chooses what a reader may answer from the metadata ``database_type`` (``country()``
needs "Country" in it, ``asn()`` "GeoLite2-ASN", ``anonymous_ip()`` "GeoIP2-Anonymous-IP"),
so each writer sets the type its reader method requires. Databases are IPv6 trees with IPv4
stored under ::/96, as MaxMind ships them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmdb_writer import MMDBWriter
from netaddr import IPSet

COUNTRY_TYPE = "GeoIP2-Country"
CITY_TYPE = "GeoIP2-City"
ASN_TYPE = "GeoLite2-ASN"
ANONYMOUS_TYPE = "GeoIP2-Anonymous-IP"


class _Writer(MMDBWriter):
    """mmdb-writer stamps ``build_epoch`` with the current time; tests need to pin it."""

    def __init__(self, build_epoch: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._build_epoch = build_epoch

    def _build_meta(self) -> dict[str, Any]:
        meta = super()._build_meta()
        if self._build_epoch is not None:
            meta["build_epoch"] = self._build_epoch
        return meta


def write_mmdb(path: Path, database_type: str, records: Mapping[str, Mapping[str, Any]],
               build_epoch: int | None = None, ip_version: int = 6) -> Path:
    """Write ``records`` (CIDR → record) to ``path`` atomically (temp file + rename); ``ip_version``
    4 writes an IPv4-only tree, which has no answer (a ValueError) for an IPv6 address."""
    writer = _Writer(build_epoch, ip_version=ip_version, database_type=database_type, languages=["en"],
                     description="Tollgate test fixture", ipv4_compatible=ip_version == 6)
    for cidr, record in records.items():
        writer.insert_network(IPSet([cidr]), dict(record))
    tmp = path.with_name(f".{path.name}.tmp")
    writer.to_db_file(str(tmp))
    os.replace(tmp, path)
    return path


def country_record(iso: str, registered: str | None = None) -> dict[str, Any]:
    return {
        "continent": {"code": "XX", "names": {"en": "Somewhere"}},
        "country": {"iso_code": iso, "names": {"en": iso}},
        "registered_country": {"iso_code": registered or iso, "names": {"en": registered or iso}},
    }


def write_country_db(path: Path, table: Mapping[str, str | tuple[str, str]], *,
                     database_type: str = COUNTRY_TYPE, build_epoch: int | None = None,
                     ip_version: int = 6) -> Path:
    """CIDR → ISO code (or (country, registered_country))."""
    records = {cidr: country_record(*((v,) if isinstance(v, str) else v)) for cidr, v in table.items()}
    return write_mmdb(path, database_type, records, build_epoch, ip_version)


def write_asn_db(path: Path, table: Mapping[str, tuple[int, str]], *, build_epoch: int | None = None) -> Path:
    records = {cidr: {"autonomous_system_number": asn, "autonomous_system_organization": org}
               for cidr, (asn, org) in table.items()}
    return write_mmdb(path, ASN_TYPE, records, build_epoch)


def write_anonymous_db(path: Path, table: Mapping[str, set[str]], *, build_epoch: int | None = None) -> Path:
    """CIDR → set of flags, e.g. {"is_anonymous_vpn"}; ``is_anonymous`` is implied as MaxMind does."""
    records = {cidr: {flag: True for flag in flags | {"is_anonymous"}} for cidr, flags in table.items()}
    return write_mmdb(path, ANONYMOUS_TYPE, records, build_epoch)
