"""The GeoIP seam: what a provider answers about an address, and how it reports its databases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.context import ClientInfo, IPAddress


@dataclass(frozen=True, slots=True)
class GeoRecord:
    """What the databases say about one address; ``None`` means "not in the database".

    ``country`` is where the address is used (MaxMind's ``country``), ``registered_country``
    where the block is registered. An unknown country is reported as ``None`` and never guessed:
    what unknown means (allow, deny) is the policy's decision.
    """

    country: str | None = None
    registered_country: str | None = None
    asn: int | None = None
    as_org: str | None = None
    is_anonymous: bool = False
    is_anonymous_vpn: bool = False
    is_hosting_provider: bool = False
    is_tor_exit_node: bool = False
    is_public_proxy: bool = False
    is_residential_proxy: bool = False

    def apply(self, client: ClientInfo) -> None:
        """Copy every field onto the request's client info."""
        client.country = self.country
        client.registered_country = self.registered_country
        client.asn = self.asn
        client.as_org = self.as_org
        client.is_anonymous = self.is_anonymous
        client.is_anonymous_vpn = self.is_anonymous_vpn
        client.is_hosting_provider = self.is_hosting_provider
        client.is_tor_exit_node = self.is_tor_exit_node
        client.is_public_proxy = self.is_public_proxy
        client.is_residential_proxy = self.is_residential_proxy


EMPTY_RECORD = GeoRecord()


@dataclass(frozen=True, slots=True)
class GeoDatabaseInfo:
    """One loaded database, for status pages and metrics."""

    role: str  # "country" | "asn" | "anonymous"
    path: str
    database_type: str | None = None  # metadata database_type, e.g. "GeoIP2-Country"
    build_epoch: int | None = None  # metadata build_epoch (seconds since the epoch)
    loaded_at: float | None = None  # wall time the file was (re)loaded
    reloads: int = 0
    reload_errors: int = 0
    last_error: str | None = None
    verified: str | None = None  # "complete", or how much of the file the load-time check covered
    lookup_errors: int = 0  # lookups that failed on damaged data (answered as unknown), since start
    last_lookup_error: str | None = None
    lookups_failing: bool = False  # a lookup failed in the last minute: readiness fails meanwhile


class GeoProvider(Protocol):
    """Answers ip → country, ASN and anonymiser flags from reloadable databases.

    ``lookup`` is synchronous and cheap (memory-mapped reads behind a cache) because it runs on
    the event loop for every request; it takes a *normalised* address and never raises: an
    address that no database knows yields :data:`EMPTY_RECORD`, and so does one whose lookup
    failed on a damaged database (counted, and reported by ``failing``). ``start`` loads the databases
    (off the event loop) and begins watching them; ``close`` stops watching and releases them.
    """

    def lookup(self, ip: IPAddress) -> GeoRecord: ...

    def databases(self) -> tuple[GeoDatabaseInfo, ...]: ...

    def failing(self) -> tuple[str, ...]:
        """Roles of databases whose lookups are failing now (the gateway is then not ready)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def lookups_failing(provider: GeoProvider) -> str | None:
    """Why ``provider`` fails the gateway's readiness now (None: it does not): each database whose
    lookups are failing, with the last error."""
    roles = provider.failing()
    if not roles:
        return None
    infos = {info.role: info for info in provider.databases()}
    return "; ".join(f"{role} database lookups failing: {infos[role].last_lookup_error}"
                     if role in infos else f"{role} database lookups failing" for role in roles)
