"""JSON Web Key Sets from a file or URL, with refresh discipline that survives abuse and outages.

- A token naming an unknown ``kid`` may trigger a refresh, but at most one fetch starts per
  ``cooldown`` whatever the request rate. Callers share the fetch in flight (single flight, a
  shielded task, so a client that disconnects cannot cancel it for the others). Between fetches
  an unknown kid is refused at once: a dict probe and a clock read, no lock, no waiting.
- Known keys are refreshed by a timer (:class:`JwksRefresher`, one task for all issuers) about
  every ``ttl``, whether tokens arrive or not, so an idle issuer stays fresh and the first token
  after a quiet spell finds current keys. Verifying a token never starts that refresh: a known
  kid costs a dict probe and a clock read. When fetching fails, the timer retries with backoff
  (``cooldown`` doubling up to ``ttl``) and the last good keys keep working for ``max_stale``
  after the last success, then verification fails closed. A document that is not a key set, or
  holds no usable key, counts as a failed fetch.
- ``revision`` changes when a refresh removes or replaces a key, so the verifier's cache of
  verified tokens drops tokens that a withdrawn key signed; :meth:`KeySource.vouches` also
  turns false once the set is past ``max_stale``, so a cached token is refused exactly when a
  fresh verification would be.
- :meth:`KeySource.freshness` tells how old the keys are and how long they stay usable, for
  ``/admin/status`` and the ``tollgate_jwks_*`` gauges: an identity provider's outage shows
  there well before tokens start failing.
- Only asymmetric public keys are accepted (``oct`` keys are dropped), and each key is bound to
  the algorithms its type supports intersected with the issuer's pinned list: an RSA key can
  never be used with HS256 or with an EC algorithm. A key that cannot be used is skipped; it
  never spoils the rest of the set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from gateway.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_FAMILIES: dict[str, frozenset[str]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC:P-256": frozenset({"ES256"}),
    "EC:P-384": frozenset({"ES384"}),
    "EC:P-521": frozenset({"ES512"}),
    "EC:secp256k1": frozenset({"ES256K"}),
    "OKP:Ed25519": frozenset({"EdDSA"}),
    "OKP:Ed448": frozenset({"EdDSA"}),
}
MAX_KEYS = 100
# Each timer interval is drawn within ± this fraction, so replicas started together (a deploy)
# do not all fetch from the identity provider in the same second, ttl after ttl.
JITTER = 0.1
_RACY_NS = 2_000_000_000  # coarsest common mtime granularity (FAT: 2 s), see JwksFile._read


class JwksError(Exception):
    """A key set could not be fetched or parsed."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    key: Any  # a cryptography public key object (compares by value)
    algorithms: frozenset[str]


def parse_jwks(
    data: bytes | str | Mapping[str, Any], allowed: frozenset[str],
) -> dict[str | None, VerificationKey]:
    """Usable signing keys of a JWKS document by kid. Unusable keys are skipped, not fatal;
    a document that is not a key set raises :class:`JwksError`."""
    try:
        doc = json.loads(data) if isinstance(data, bytes | str) else data
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise JwksError(f"not JSON: {type(exc).__name__}") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise JwksError("expected an object with a 'keys' list")
    out: dict[str | None, VerificationKey] = {}
    for jwk in doc["keys"][:MAX_KEYS]:
        key = _verification_key(jwk, allowed)
        if key is not None:
            out[key.kid] = key
    return out


def _verification_key(jwk: Any, allowed: frozenset[str]) -> VerificationKey | None:
    """One JWK as a verification key, or None when it is not a usable signing key for us.
    Every member is type-checked before use: a malformed key is dropped, never raised."""
    if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    kty, crv, alg, kid = jwk.get("kty"), jwk.get("crv"), jwk.get("alg"), jwk.get("kid")
    if not isinstance(kty, str) or not (crv is None or isinstance(crv, str)):
        return None
    family = _FAMILIES.get(kty if kty == "RSA" else f"{kty}:{crv}")
    if family is None:  # includes "oct": shared secrets are never verification keys here
        return None
    algs = family & allowed
    if alg is not None:
        algs = algs & {alg} if isinstance(alg, str) else frozenset()
    if not algs or not (kid is None or isinstance(kid, str)):
        return None
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=sorted(algs)[0]).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if hasattr(key, "private_numbers"):
        key = key.public_key()  # a JWKS leaking private parts still only verifies
    return VerificationKey(kid, key, frozenset(algs))


@dataclass(frozen=True, slots=True)
class Freshness:
    """How current one issuer's key set is, read at one instant of its source's clock."""

    age: float | None  # seconds since the last successful fetch; None: never fetched
    stale_in: float  # seconds the keys stay usable (``max_stale`` after that fetch); 0 when stale
    stale: bool  # past ``max_stale`` (or never loaded): every token of the issuer is refused


class KeySource:
    """Cached keys of one issuer; subclasses say how to fetch the document. ``ttl`` is for the
    :class:`JwksRefresher` that keeps the keys fresh; requests never refresh keys they find."""

    def __init__(self, allowed: frozenset[str], *, ttl: float = 600.0, cooldown: float = 30.0,
                 max_stale: float = 86400.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._allowed = allowed
        self._ttl = ttl
        self._cooldown = cooldown
        self._max_stale = max_stale
        self._clock = clock
        self._keys: dict[str | None, VerificationKey] = {}
        self._last_success: float | None = None
        # On the source's clock: past this the keys are too stale to trust (never loaded: -inf).
        # One float, so the verified-token cache can check it on every hit for the cost of a
        # comparison.
        self._usable_until = -math.inf
        self._last_attempt: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._doc: bytes | None = None  # the document the current keys were parsed from
        self._ok = False  # whether the last finished fetch succeeded
        self.failing = 0  # failed fetches since the last success (the timer's backoff)
        self.revision = 0  # bumped when a refresh removes or replaces a key
        self.fetches = 0  # for tests and metrics
        self.failures = 0

    async def _fetch(self) -> bytes:
        raise NotImplementedError

    async def get(self, kid: str | None) -> VerificationKey | None:
        """The key for ``kid`` (None: the only key, if there is exactly one), fetching if allowed:
        a kid the set lacks, or a set never loaded or past ``max_stale``, may start a fetch (at
        most one per cooldown). Keys found are returned as they are: keeping them current is
        :class:`JwksRefresher`'s job, not the request's."""
        now = self._clock()
        found = self._lookup(kid, now)
        if found is not None:
            return found
        task = self._inflight
        if task is None or task.done():
            if not self._may_fetch(now):
                return None  # fetched within the cooldown: refuse at once
            task = self._start_refresh(now)
        await asyncio.shield(task)  # our cancellation must not cancel everyone's fetch
        return self._lookup(kid, self._clock())

    def prefetch(self) -> None:
        """Start loading the keys in the background (at start-up), so the first requests find
        them instead of waiting on the fetch; a failure is logged and retried by the timer (and
        on demand)."""
        now = self._clock()
        if self._last_success is None and self._may_fetch(now):
            self._start_refresh(now)

    async def refresh(self) -> bool:
        """Fetch now, or join the fetch in flight (single flight); whether it succeeded. Not
        gated by the cooldown: the caller (:class:`JwksRefresher`) keeps its own distance."""
        task = self._inflight
        if task is None or task.done():
            task = self._start_refresh(self._clock())
        return await asyncio.shield(task)  # a cancelled caller must not cancel everyone's fetch

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def cooldown(self) -> float:
        return self._cooldown

    @property
    def fetching(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    @property
    def ok(self) -> bool:
        """Whether the last finished fetch succeeded (False before the first one)."""
        return self._ok

    @property
    def last_success(self) -> float | None:
        """When the last successful fetch ended, on :meth:`now`'s clock."""
        return self._last_success

    @property
    def last_attempt(self) -> float | None:
        """When the last fetch started, on :meth:`now`'s clock."""
        return self._last_attempt

    def now(self) -> float:
        return self._clock()

    def vouches(self, revision: int) -> bool:
        """Whether a token verified with this set's keys at ``revision`` may still be accepted
        without verifying it again: no key has been withdrawn or replaced since, and the set is
        not past ``max_stale`` (when :meth:`get` would refuse every key). Called on every hit of
        the verified-token cache, so it is a clock read and two comparisons."""
        return revision == self.revision and self._clock() <= self._usable_until

    def freshness(self) -> Freshness:
        """The key set's age and time left before it goes stale; not on the request path (read
        by /admin/status and at scrape time)."""
        now = self._clock()
        last = self._last_success
        return Freshness(age=None if last is None else max(0.0, now - last),
                         stale_in=max(0.0, self._usable_until - now),
                         stale=now > self._usable_until)  # as _lookup decides

    def _lookup(self, kid: str | None, now: float) -> VerificationKey | None:
        if now > self._usable_until:
            return None  # never loaded, or too stale to trust: fail closed
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        idle = self._inflight is None or self._inflight.done()
        return idle and (self._last_attempt is None or now - self._last_attempt >= self._cooldown)

    def _start_refresh(self, now: float) -> asyncio.Task[bool]:
        self._last_attempt = now  # closes the gate before the task even starts
        self._inflight = asyncio.create_task(self._refresh(), name=f"jwks-refresh {self}")
        return self._inflight

    async def _refresh(self) -> bool:
        self.fetches += 1
        try:
            doc = await self._fetch()
            # The same document as last time (the usual case on the timer) needs no parsing:
            # the keys and the revision stay as they are.
            if doc != self._doc:
                keys = parse_jwks(doc, self._allowed)
                if not keys:
                    raise JwksError("no usable signing key in the set")
                if any(keys.get(kid) != key for kid, key in self._keys.items()):
                    self.revision += 1  # a key was withdrawn or replaced: tokens it signed are void
                self._keys, self._doc = keys, doc
        except (JwksError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            # At most one attempt per cooldown, so this line is rate-limited by construction.
            self.failures += 1
            self.failing += 1
            self._ok = False
            log.warning("JWKS refresh failed for %s, keeping last good keys: %s: %s", self,
                        type(exc).__name__, exc)
            return False
        self.failing = 0
        self._ok = True
        self._last_success = self._clock()
        self._usable_until = self._last_success + self._max_stale
        return True

    async def join(self) -> None:
        """Wait for a running refresh (tests, orderly shutdown)."""
        if self._inflight is not None:
            await self._inflight

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            try:
                await self._inflight
            except asyncio.CancelledError:
                pass


class JwksFile(KeySource):
    """Keys from a local file, re-read under the same discipline as a URL. On the timer that is
    an open and a stat: the file is read again only when its inode, size or mtime changed (a
    file that is still there and unchanged counts as a successful fetch of the same set)."""

    def __init__(self, path: Path, allowed: frozenset[str], *, max_bytes: int = 1 << 20,
                 **kwargs: Any) -> None:
        super().__init__(allowed, **kwargs)
        self.path = path
        self._max_bytes = max_bytes
        # The file id (inode, size, mtime) and contents of the last read, and the wall time
        # before that read (ns).
        self._seen: tuple[tuple[int, int, int], bytes, int] | None = None
        self.reads = 0  # for tests

    async def _fetch(self) -> bytes:
        return await asyncio.to_thread(self._read)

    def _read(self) -> bytes:
        with self.path.open("rb") as f:
            # fstat of the open file, not stat of the name: a file replaced in between cannot
            # have its contents filed under the old file's id.
            st = os.fstat(f.fileno())
            file_id = (st.st_ino, st.st_size, st.st_mtime_ns)
            seen = self._seen
            # Trusted only if the file was last modified well before that read: a file rewritten
            # in place, to the same size, within the file system's mtime granularity of the read
            # would otherwise keep its old id, and its old contents here, for good.
            if seen is not None and seen[0] == file_id and st.st_mtime_ns < seen[2] - _RACY_NS:
                return seen[1]
            read_at = time.time_ns()
            data = f.read(self._max_bytes + 1)  # never more than the cap into memory
        self.reads += 1
        if len(data) > self._max_bytes:
            raise JwksError(f"file larger than {self._max_bytes} bytes")
        self._seen = (file_id, data, read_at)
        return data

    def __str__(self) -> str:
        return str(self.path)


class JwksUrl(KeySource):
    """Keys from an HTTPS endpoint, fetched with aiohttp.

    Responses are size-capped while streaming (decompressed bytes count), the whole exchange is
    bounded by ``timeout``, redirects are not followed (a 3xx is a failed fetch, so a redirect
    can never lead to plain http or another host), and TLS certificates are verified (aiohttp's
    default; ``session`` is for tests and must not be one that disables verification).
    """

    def __init__(self, url: str, allowed: frozenset[str], *, timeout: float = 5.0,
                 max_bytes: int = 1 << 20, session: aiohttp.ClientSession | None = None,
                 **kwargs: Any) -> None:
        super().__init__(allowed, **kwargs)
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes
        self._session = session
        self._own_session = session is None

    async def _fetch(self) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(self.url, timeout=self._timeout, allow_redirects=False,
                                     headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise JwksError(f"HTTP {resp.status}")
            if (resp.content_length or 0) > self._max_bytes:
                raise JwksError(f"response larger than {self._max_bytes} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > self._max_bytes:
                    raise JwksError(f"response larger than {self._max_bytes} bytes")
            return bytes(body)

    async def close(self) -> None:
        await super().close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def __str__(self) -> str:
        return self.url


@dataclass(slots=True)
class _Schedule:
    """When :class:`JwksRefresher` next looks at one source."""

    source: KeySource
    due: float = -math.inf  # on the source's clock; -inf: at once (start-up)
    seen: int = -1  # the source's fetch count when last scheduled: another count means someone
    # else (a token naming a new kid, the start-up prefetch) fetched since


class JwksRefresher:
    """One background task keeping every issuer's key set current whether tokens arrive or not.

    Each source is refreshed about every ``ttl`` (± :data:`JITTER`) counted from its last
    successful fetch, whoever made it: a token naming a new kid that made the set fetch resets
    the timer instead of adding a fetch. A failed fetch is retried after ``cooldown``, doubling
    each time up to ``ttl`` (± jitter, never under ``cooldown``). A visit joins a fetch already
    in flight (the source's single flight) and never starts one within ``cooldown`` of the
    source's last attempt, so the source's rule of at most one fetch per cooldown holds with the
    timer too. The source's clock tells the time; ``sleep`` and ``rand`` (a float in [0, 1))
    are injected so tests drive the timer without waiting.
    """

    def __init__(self, sources: Iterable[KeySource], *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] | None = None) -> None:
        self._schedules = [_Schedule(source) for source in sources]
        self._sleep = sleep
        self._rand = rand or random.Random().random
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Fetch every set never loaded now (in the background: a provider that is down must
        not hold up the start), then keep them all fresh. Needs a running event loop."""
        if self._task is not None or not self._schedules:
            return
        for schedule in self._schedules:
            schedule.source.prefetch()
        self._task = asyncio.create_task(self._run(), name="jwks-refresh-timer")

    async def stop(self) -> None:
        """Cancel the timer and wait for it (a fetch it joined is the source's to cancel)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            due = [s for s in self._schedules if s.due <= s.source.now()]
            if due:
                # Together: one slow provider (up to its timeout) does not hold up the others
                # due at the same moment.
                await asyncio.gather(*(self._visit(s) for s in due))
            else:
                await self._sleep(min(s.due - s.source.now() for s in self._schedules))

    async def _visit(self, schedule: _Schedule) -> None:
        source = schedule.source
        try:
            if source.fetching:
                await source.refresh()  # joins the fetch in flight
            elif source.fetches == schedule.seen or not source.ok:
                # Ours to fetch: nobody else did since the last visit, or their fetch failed (a
                # token's failure must not put off the timer's retry, nor its recovery).
                last = source.last_attempt
                if last is not None and source.now() - last < source.cooldown:
                    schedule.due = last + source.cooldown
                    return
                await source.refresh()
            # else: a token's fetch succeeded since the last visit: count from that one
        except Exception:  # a bug in a fetch must not stop the refreshes of every issuer
            log.exception("JWKS refresh of %s failed unexpectedly", source)
            schedule.seen = source.fetches
            schedule.due = source.now() + max(source.cooldown, source.ttl)
            return
        self._reschedule(schedule)

    def _reschedule(self, schedule: _Schedule) -> None:
        source = schedule.source
        schedule.seen = source.fetches
        jitter = 1.0 + JITTER * (2.0 * self._rand() - 1.0)
        last = source.last_success
        if source.ok and last is not None:
            # Never sooner than the cooldown, even with a ttl configured shorter.
            schedule.due = last + max(source.cooldown, source.ttl * jitter)
        else:
            # Doubling from the cooldown up to the ttl, so a provider that is down is asked ever
            # less often but never less often than a healthy one; jittered like every interval.
            backoff = min(source.cooldown * 2.0 ** min(source.failing - 1, 30), source.ttl)
            schedule.due = source.now() + max(source.cooldown, backoff * jitter)
