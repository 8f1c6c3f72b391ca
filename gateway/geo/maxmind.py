"""MaxMind (MMDB) GeoProvider: Country/City/Enterprise, ASN and Anonymous-IP databases.

The opened databases and their lookup cache form one immutable-by-convention state object;
a reload opens and verifies the new files off the event loop and swaps that one reference, so a
request never sees a half-updated set and the cache can never serve an answer from the old file.
A lookup that fails on a damaged database is counted, logged at most once a minute per database,
and makes the provider report that database as failing (readiness) for a minute.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import geoip2.database
import geoip2.errors
import maxminddb

from gateway.context import IPAddress
from gateway.geo.base import EMPTY_RECORD, GeoDatabaseInfo, GeoRecord
from gateway.geo.config import GeoIpConfig
from gateway.geo.verify import DAMAGE_ERRORS, DEFAULT_BUDGET, DatabaseDamaged, verify_database
from gateway.tasks import cancel_and_wait
from gateway.watch import FileWatcher

log = logging.getLogger(__name__)

ROLES = ("country", "asn", "anonymous")
# How long a database counts as failing after its last lookup error, and the least time between
# two log lines about its lookup errors (a damaged database fails every request: one line a minute).
LOOKUP_ERROR_WINDOW = 60.0


class GeoDatabaseError(Exception):
    """A configured database could not be opened, or is of the wrong type for its role."""


@dataclass(frozen=True, slots=True)
class _Opened:
    role: str
    path: str
    reader: geoip2.database.Reader
    method: Callable[[IPAddress], Any]  # the geoip2 reader call this database type allows
    kind: str  # "country" | "city" | "enterprise" | "asn" | "isp" | "anonymous"
    file_id: tuple[int, int, int]  # inode, size, mtime_ns of the file that was opened
    verified: str  # "complete", or how much of the data section was checked
    ipv4_only: bool  # an IPv6 address is simply not in it (the reader raises ValueError)


# Attempts at opening a file that is being replaced meanwhile (geoipupdate renames a new file in):
# the second attempt opens the new file; a file that keeps changing is refused.
_OPEN_ATTEMPTS = 3


def open_database(role: str, path: Path, verify_budget: float = DEFAULT_BUDGET) -> _Opened:
    """Open ``path`` for ``role`` (blocking: run it in a thread), pick the reader call and verify
    the file (see gateway.geo.verify): a damaged file raises GeoDatabaseError like a missing one.

    geoip2 refuses a call whose name is not in the metadata ``database_type`` (``country()``
    on a City database raises), so the call is chosen from the type here, once.
    """
    attempts_left = _OPEN_ATTEMPTS
    while True:
        try:
            return _open_verified(role, path, verify_budget)
        except _Replaced:
            attempts_left -= 1
            if not attempts_left:
                raise GeoDatabaseError(f"{role} database {path}: kept changing while being opened") from None


class _Replaced(Exception):
    """The file at the path changed while it was being opened and verified."""


def _open_verified(role: str, path: Path, verify_budget: float) -> _Opened:
    try:
        st = os.stat(path)
        reader = geoip2.database.Reader(str(path))
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise GeoDatabaseError(f"{role} database {path}: cannot open: {exc}") from exc
    meta = reader.metadata()
    db_type = meta.database_type
    choice: tuple[Callable[[IPAddress], Any], str] | None = None
    if role == "country":
        if "Enterprise" in db_type:
            choice = reader.enterprise, "enterprise"
        elif "City" in db_type:
            choice = reader.city, "city"
        elif "Country" in db_type:
            choice = reader.country, "country"
    elif role == "asn":
        if "GeoLite2-ASN" in db_type:
            choice = reader.asn, "asn"
        elif "GeoIP2-ISP" in db_type:
            choice = reader.isp, "isp"
    elif role == "anonymous" and "GeoIP2-Anonymous-IP" in db_type:
        choice = reader.anonymous_ip, "anonymous"
    if choice is None:
        reader.close()
        raise GeoDatabaseError(f"{role} database {path}: type '{db_type}' cannot be used as {role}_db")
    method, kind = choice
    file_id = _file_id(st)
    try:
        checked = verify_database(path, method, budget=verify_budget)
    except (OSError, DatabaseDamaged) as exc:
        reader.close()
        raise GeoDatabaseError(f"{role} database {path}: damaged, refused: {exc}") from exc
    # The reader, the verifier and its probe reader each open the path: all must have seen one file.
    try:
        now_id = _file_id(os.stat(path))
    except OSError:
        now_id = None
    if checked.file_id != file_id or now_id != file_id:
        reader.close()
        raise _Replaced
    return _Opened(role, str(path), reader, method, kind, file_id, checked.describe(), meta.ip_version == 4)


def _file_id(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


class LookupErrors:
    """Lookup failures of one database role, across reloads; touched only when a lookup fails."""

    __slots__ = ("role", "count", "last_error", "last_at", "_clock", "_logged_at", "_unlogged")

    def __init__(self, role: str, clock: Callable[[], float]) -> None:
        self.role = role
        self.count = 0
        self.last_error: str | None = None
        self.last_at: float | None = None  # monotonic
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0

    def record(self, exc: Exception, ip: IPAddress) -> None:
        now = self._clock()
        self.count += 1
        # The reader names the address; status and logs need only what broke.
        self.last_error = f"{type(exc).__name__}: {str(exc).replace(str(ip), '<address>')}"
        self.last_at = now
        self._unlogged += 1
        if self._logged_at is None or now - self._logged_at >= LOOKUP_ERROR_WINDOW:
            log.error("geoip %s database lookups failing (%d since the last report, %d in all): %s",
                      self.role, self._unlogged, self.count, self.last_error)
            self._logged_at, self._unlogged = now, 0

    def failing(self) -> bool:
        return self.last_at is not None and self._clock() - self.last_at < LOOKUP_ERROR_WINDOW

    def new_database(self) -> None:
        """A new file replaced the failing one: its errors were the old file's (the count stays)."""
        self.last_at = self._logged_at = None
        self._unlogged = 0


class _State:
    """The databases in use plus a cache of answers from exactly these databases."""

    __slots__ = ("dbs", "cache", "size", "errors")

    def __init__(self, dbs: dict[str, _Opened], size: int, errors: dict[str, LookupErrors]) -> None:
        self.dbs = dbs
        self.cache: OrderedDict[int, GeoRecord] = OrderedDict()
        self.size = size
        self.errors = errors

    def resolve(self, ip: IPAddress) -> tuple[GeoRecord, bool]:
        """The record and whether every database answered (an answer after an error is not cached)."""
        fields: dict[str, Any] = {}
        complete = True
        for role in ROLES:
            db = self.dbs.get(role)
            if db is None:
                continue
            try:
                model = db.method(ip)
            except geoip2.errors.AddressNotFoundError:
                continue
            except DAMAGE_ERRORS as exc:
                if ip.version == 6 and db.ipv4_only and isinstance(exc, ValueError):
                    continue  # not damage: an IPv4-only database has no IPv6 addresses
                # Damaged data under this address (an InvalidDatabaseError from the reader, or a
                # record of the wrong shape for geoip2's model): unknown for this request, but
                # never silently, and never cached.
                self.errors[role].record(exc, ip)
                complete = False
                continue
            _extract(db.kind, model, fields)
        return (GeoRecord(**fields) if fields else EMPTY_RECORD), complete


_FLAGS = ("is_anonymous", "is_anonymous_vpn", "is_hosting_provider", "is_tor_exit_node",
          "is_public_proxy", "is_residential_proxy")


def _extract(kind: str, model: Any, out: dict[str, Any]) -> None:
    if kind in ("country", "city", "enterprise"):
        out["country"] = model.country.iso_code
        out["registered_country"] = model.registered_country.iso_code
        traits = model.traits
        # Enterprise (and some City) records carry ASN and anonymiser traits; a dedicated
        # ASN/Anonymous-IP database, resolved later, overrides them.
        if getattr(traits, "autonomous_system_number", None) is not None:
            out["asn"] = traits.autonomous_system_number
            out["as_org"] = traits.autonomous_system_organization
        for flag in _FLAGS:
            if getattr(traits, flag, False):
                out[flag] = True
    elif kind in ("asn", "isp"):
        out["asn"] = model.autonomous_system_number
        out["as_org"] = model.autonomous_system_organization
    else:
        for flag in _FLAGS:
            out[flag] = bool(getattr(model, flag, False)) or out.get(flag, False)


class MaxMindGeoProvider:
    """GeoProvider over geoip2 readers with an LRU cache and hot reload on file replacement."""

    def __init__(self, config: GeoIpConfig, wall_clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 verify_budget: float = DEFAULT_BUDGET) -> None:
        self._config = config
        self._clock = wall_clock
        self._verify_budget = verify_budget
        self._paths = {role: getattr(config, f"{role}_db") for role in ROLES}
        self._paths = {r: p for r, p in self._paths.items() if p is not None}
        self._errors = {r: LookupErrors(r, monotonic) for r in self._paths}
        self._state = _State({}, config.cache_size, self._errors)
        self._infos = {r: GeoDatabaseInfo(role=r, path=str(p)) for r, p in self._paths.items()}
        self._watcher: FileWatcher | None = None
        self._catch_up: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ---- lifecycle ----------------------------------------------------------------------
    def load(self) -> None:
        """Open every configured database (blocking). Raises GeoDatabaseError on the first failure:
        at start-up a missing or wrong database is a configuration error, not a degraded mode."""
        opened = {role: open_database(role, path, self._verify_budget) for role, path in self._paths.items()}
        now = self._clock()
        for role, db in opened.items():
            self._infos[role] = self._info_for(db, now, self._infos[role], reloaded=False)
        self._swap(opened)

    async def start(self) -> None:
        """Load off the event loop, then watch the files (if ``reload_interval`` > 0)."""
        await asyncio.to_thread(self.load)
        if self._config.reload_interval > 0 and self._paths and self._watcher is None:
            interval = self._config.reload_interval
            self._watcher = FileWatcher(list(self._paths.values()), self.reload,
                                        interval=interval, debounce=min(interval, 0.5))
            self._watcher.start()
            # The watcher takes its baseline inside its task, after our load: a file replaced
            # in between would go unnoticed. One delayed check (file ids vs. loaded) closes that.
            self._catch_up = asyncio.create_task(self._reload_later(interval), name="geoip-catch-up")

    async def _reload_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.reload()

    async def close(self) -> None:
        await cancel_and_wait(self._catch_up)
        self._catch_up = None
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        old, self._state = self._state, _State({}, self._config.cache_size, self._errors)
        for db in old.dbs.values():
            db.reader.close()

    async def reload(self) -> None:
        """Reopen databases whose file changed; a failing file keeps its previous reader."""
        async with self._lock:
            current = self._state.dbs
            fresh: dict[str, _Opened] = {}
            for role, path in self._paths.items():
                info = self._infos[role]
                try:
                    st = await asyncio.to_thread(os.stat, path)
                    old = current.get(role)
                    if old is not None and old.file_id == (st.st_ino, st.st_size, st.st_mtime_ns):
                        continue
                    fresh[role] = await asyncio.to_thread(open_database, role, path, self._verify_budget)
                except (OSError, GeoDatabaseError) as exc:
                    log.warning("geoip %s database not reloaded, keeping the loaded one: %s", role, exc)
                    self._infos[role] = replace(info, reload_errors=info.reload_errors + 1,
                                                last_error=str(exc))
            if not fresh:
                return
            now = self._clock()
            for role, db in fresh.items():
                self._infos[role] = self._info_for(db, now, self._infos[role], reloaded=True)
                log.info("geoip %s database reloaded: %s (built %s)", role,
                         self._infos[role].database_type, self._infos[role].build_epoch)
            self._swap({**current, **fresh})

    def _swap(self, dbs: dict[str, _Opened]) -> None:
        old = self._state
        self._state = _State(dbs, self._config.cache_size, self._errors)
        # Lookups run synchronously on the loop, so no lookup is using a replaced reader now.
        for role, db in old.dbs.items():
            if dbs.get(role) is not db:
                db.reader.close()
                self._errors[role].new_database()

    @staticmethod
    def _info_for(db: _Opened, now: float, previous: GeoDatabaseInfo, reloaded: bool) -> GeoDatabaseInfo:
        # reload_errors counts across reloads (a metric); last_error is about the file in use.
        meta = db.reader.metadata()
        return GeoDatabaseInfo(role=db.role, path=db.path, database_type=meta.database_type,
                               build_epoch=int(meta.build_epoch), loaded_at=now,
                               reloads=previous.reloads + reloaded, reload_errors=previous.reload_errors,
                               verified=db.verified)

    # ---- queries ------------------------------------------------------------------------
    def lookup(self, ip: IPAddress) -> GeoRecord:
        state = self._state
        # Integer keys: hashing an int is far cheaper than hashing an ipaddress object; the
        # version bit keeps ::1-style IPv6 values apart from IPv4 ones.
        key = int(ip) if ip.version == 4 else int(ip) | (1 << 128)
        cache = state.cache
        record = cache.get(key)
        if record is not None:
            cache.move_to_end(key)
            return record
        record, complete = state.resolve(ip)
        if complete and state.size:
            cache[key] = record
            if len(cache) > state.size:
                cache.popitem(last=False)
        return record

    def databases(self) -> tuple[GeoDatabaseInfo, ...]:
        return tuple(self._with_errors(self._infos[r]) for r in ROLES if r in self._infos)

    def failing(self) -> tuple[str, ...]:
        """Roles whose lookups failed within the last LOOKUP_ERROR_WINDOW seconds."""
        return tuple(r for r in ROLES if r in self._errors and self._errors[r].failing())

    def _with_errors(self, info: GeoDatabaseInfo) -> GeoDatabaseInfo:
        errors = self._errors[info.role]
        if not errors.count:
            return info
        return replace(info, lookup_errors=errors.count, last_lookup_error=errors.last_error,
                       lookups_failing=errors.failing())
