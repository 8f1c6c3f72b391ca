"""JWKS fetching under abuse and failure: refetch storms, cancelled callers, hostile or broken
responses, key rotation and withdrawal (including tokens already in the verified-token cache)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.identity.config import JwtConfig
from gateway.identity.jwks import JwksError, JwksFile, JwksUrl, KeySource, parse_jwks
from gateway.identity.jwt import InvalidToken, JwtVerifier
from tests.unit.identity.test_jwt import issuer_config
from tests.unit.identity.tokens import ISSUER, FakeClock, claims, public_jwk, sign

ALLOWED = frozenset({"RS256", "ES256"})


class DocSource(KeySource):
    """A key source serving ``doc`` (bytes or an object), optionally held until ``gate`` opens."""

    def __init__(self, doc: Any, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(ALLOWED, clock=clock, **kwargs)
        self.doc = doc
        self.gate: asyncio.Event | None = None

    async def _fetch(self) -> bytes:
        if self.gate is not None:
            await self.gate.wait()
        return self.doc if isinstance(self.doc, bytes) else json.dumps(self.doc).encode()


def verifier_for(source: KeySource, **config: Any) -> JwtVerifier:
    cfg = issuer_config(algorithms=tuple(sorted(ALLOWED)))
    return JwtVerifier(JwtConfig(issuers=(cfg,), **config), sources={ISSUER: source})


# ---- refetch storms and single flight ---------------------------------------------------------
async def test_unknown_kid_within_cooldown_is_refused_without_fetching_or_waiting(
        rsa_key: Any, clock: FakeClock) -> None:
    source = DocSource({"keys": [public_jwk(rsa_key, "k1")]}, clock, cooldown=30)
    assert await source.get("k1") is not None and source.fetches == 1
    source.gate = asyncio.Event()  # a fetch now would hang: the refusal must not start one
    for i in range(1000):
        assert await asyncio.wait_for(source.get(f"random-{i}"), 1) is None
    assert source.fetches == 1


async def test_a_new_kid_seen_during_cooldown_is_fetched_as_soon_as_it_ends(
        rsa_key: Any, other_rsa_key: Any, clock: FakeClock) -> None:
    # Regression: unknown kids used to be remembered for a whole cooldown from when they were
    # seen, so a freshly rotated key seen just before the gate opened stayed refused for longer.
    source = DocSource({"keys": [public_jwk(rsa_key, "k1")]}, clock, cooldown=30)
    await source.get("k1")
    clock.advance(25)
    assert await source.get("k2") is None  # not published yet, and the gate is closed
    source.doc = {"keys": [public_jwk(rsa_key, "k1"), public_jwk(other_rsa_key, "k2")]}
    clock.advance(5)
    assert await source.get("k2") is not None and source.fetches == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
        rsa_key: Any, other_rsa_key: Any, clock: FakeClock) -> None:
    # Regression: the fetch ran inside the first caller's task, so a client that hung up
    # cancelled it for everyone and closed the gate for a cooldown (a cheap way to keep a
    # rotated key refused, again and again).
    source = DocSource({"keys": [public_jwk(rsa_key, "k1"), public_jwk(other_rsa_key, "k2")]}, clock)
    source.gate = asyncio.Event()
    first = asyncio.create_task(source.get("k2"))
    second = asyncio.create_task(source.get("k2"))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    source.gate.set()
    assert (await second) is not None
    with pytest.raises(asyncio.CancelledError):
        await first
    assert source.fetches == 1


async def test_concurrent_unknown_kids_wait_for_one_fetch(rsa_key: Any, clock: FakeClock) -> None:
    source = DocSource({"keys": [public_jwk(rsa_key, "k1")]}, clock)
    source.gate = asyncio.Event()
    waiters = [asyncio.create_task(source.get(kid)) for kid in ["k1", "x", "y"] * 50]
    await asyncio.sleep(0)
    source.gate.set()
    results = await asyncio.gather(*waiters)
    assert source.fetches == 1 and sum(r is not None for r in results) == 50


# ---- parsing: a bad key never spoils the set ------------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("alg", ["RS256"]), ("alg", {"x": 1}), ("alg", 256), ("kty", ["RSA"]), ("kty", None),
    ("crv", ["P-256"]), ("kid", 7), ("kid", ["k"]), ("n", 12), ("n", ["x"]), ("n", None), ("e", {}),
    ("use", ["sig"]), ("use", "enc"), ("key_ops", ["encrypt"]), ("key_ops", "verify"), ("alg", "HS256"),
    ("kty", "oct"), ("kty", "RSA-OAEP"),
])
def test_a_malformed_or_unusable_key_is_skipped_and_the_rest_kept(
        rsa_key: Any, field: str, value: Any) -> None:
    bad = public_jwk(rsa_key, "bad") | {field: value}
    keys = parse_jwks(json.dumps({"keys": [bad, public_jwk(rsa_key, "good")]}), ALLOWED)
    assert set(keys) == {"good"}


def test_key_ops_with_verify_is_kept(rsa_key: Any) -> None:
    keys = parse_jwks({"keys": [public_jwk(rsa_key, "k") | {"key_ops": ["verify"]}]}, ALLOWED)
    assert set(keys) == {"k"}


@pytest.mark.parametrize("doc", [
    b"[" * 100_000, b'{"keys": ' + b"[" * 100_000, b"\xff\xfe\x00", b"null", b'{"keys": {}}',
    b'{"keys": "k1"}', b"<html>login</html>", b"",
])
def test_a_document_that_is_not_a_key_set_is_an_error(doc: bytes) -> None:
    with pytest.raises(JwksError):
        parse_jwks(doc, ALLOWED)


@pytest.mark.parametrize("doc", [
    b"<html>maintenance</html>", b"[" * 100_000, {"keys": []}, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]},
    {"keys": [{"kty": "RSA", "alg": ["RS256"], "n": "x", "e": "AQAB"}]}, {"jwks": []},
])
async def test_a_bad_refresh_keeps_the_last_good_keys_and_logs(
        rsa_key: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture, doc: Any) -> None:
    source = DocSource({"keys": [public_jwk(rsa_key, "k1")]}, clock, cooldown=30)
    v = verifier_for(source, cache_size=0)
    token = sign(rsa_key, claims())
    await v.authenticate(token)
    source.doc = doc
    clock.advance(31)
    with caplog.at_level(logging.WARNING, "gateway.identity.jwks"):
        assert await source.get("unknown") is None
        for _ in range(100):  # later attempts within the cooldown neither fetch nor log
            assert await source.get("unknown") is None
    assert source.failures == 1 and source.fetches == 2
    assert [r.message.startswith("JWKS refresh failed") for r in caplog.records] == [True]
    assert (await v.authenticate(token)).account == "acct-1"  # the last good key still works


# ---- HTTP: errors, redirects, size, compression, time, TLS --------------------------------------
@pytest.fixture
async def http_jwks(aiohttp_server: Any, rsa_key: Any) -> AsyncIterator[tuple[dict[str, Any], TestServer]]:
    """A JWKS endpoint whose behaviour the test picks by setting ``state["mode"]``."""
    state: dict[str, Any] = {"mode": "ok", "hits": 0, "release": asyncio.Event()}
    good = json.dumps({"keys": [public_jwk(rsa_key, "k1")]}).encode()

    async def handle(request: web.Request) -> web.StreamResponse:
        state["hits"] += 1
        mode = state["mode"]
        if mode == "ok":
            return web.Response(body=good, content_type="application/json")
        if mode in ("404", "500", "503"):
            return web.Response(status=int(mode), text="no")
        if mode == "redirect":
            raise web.HTTPFound(state["location"])
        if mode == "slow":
            await state["release"].wait()
            return web.Response(body=good)
        if mode == "endless":  # chunked, no content-length, never ends by itself
            resp = web.StreamResponse()
            await resp.prepare(request)
            for _ in range(100_000):
                await resp.write(b" " * 65536)
            return resp
        if mode == "gzip-bomb":  # 64 MB of spaces in ~64 kB
            body = gzip.compress(b" " * (64 << 20), compresslevel=9)
            return web.Response(body=body, headers={"Content-Encoding": "gzip",
                                                    "Content-Type": "application/json"})
        raise AssertionError(mode)

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    server = await aiohttp_server(app)
    yield state, server
    state["release"].set()


def http_source(server: TestServer, clock: FakeClock, **kwargs: Any) -> JwksUrl:
    return JwksUrl(str(server.make_url("/jwks.json")), ALLOWED, clock=clock, cooldown=30,
                   **{"max_bytes": 100_000, "timeout": 5.0} | kwargs)


@pytest.mark.parametrize("mode", ["404", "500", "503", "endless", "gzip-bomb"])
async def test_http_failures_keep_the_last_good_keys(
        http_jwks: tuple[dict[str, Any], TestServer], clock: FakeClock, mode: str) -> None:
    state, server = http_jwks
    source = http_source(server, clock)
    try:
        assert await source.get("k1") is not None
        state["mode"] = mode
        clock.advance(31)
        started = time.monotonic()
        assert await source.get("k2") is None
        assert time.monotonic() - started < 3  # the size cap stops the stream early
        assert source.failures == 1 and await source.get("k1") is not None
    finally:
        await source.close()


async def test_fetch_is_bounded_by_the_timeout(http_jwks: tuple[dict[str, Any], TestServer],
                                               clock: FakeClock) -> None:
    state, server = http_jwks
    state["mode"] = "slow"
    source = http_source(server, clock, timeout=0.2)
    try:
        started = time.monotonic()
        assert await source.get("k1") is None
        assert time.monotonic() - started < 2 and source.failures == 1
    finally:
        await source.close()


async def test_redirects_are_not_followed(http_jwks: tuple[dict[str, Any], TestServer],
                                          aiohttp_server: Any, clock: FakeClock, other_rsa_key: Any) -> None:
    # Following would let the endpoint (or whoever can make it redirect) send us to plain http,
    # another host, or an internal address.
    state, server = http_jwks
    elsewhere_hits = 0

    async def elsewhere(request: web.Request) -> web.Response:
        nonlocal elsewhere_hits
        elsewhere_hits += 1
        return web.json_response({"keys": [public_jwk(other_rsa_key, "evil")]})

    app = web.Application()
    app.router.add_get("/jwks.json", elsewhere)
    plain = await aiohttp_server(app)
    state["mode"], state["location"] = "redirect", str(plain.make_url("/jwks.json"))
    source = http_source(server, clock)
    try:
        assert await source.get("evil") is None
        assert state["hits"] == 1 and elsewhere_hits == 0 and source.failures == 1
    finally:
        await source.close()


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed cert for 127.0.0.1, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.create_default_context(cafile=str(cert_path))
    return server_ctx, client_ctx


async def test_tls_certificates_are_verified(aiohttp_server: Any, tmp_path: Path, rsa_key: Any,
                                             clock: FakeClock) -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"keys": [public_jwk(rsa_key, "k1")]})

    app = web.Application()
    app.router.add_get("/jwks.json", handle)
    server_ctx, client_ctx = _self_signed(tmp_path)
    server = await aiohttp_server(app, ssl=server_ctx)
    url = str(server.make_url("/jwks.json"))
    assert url.startswith("https://")
    untrusting = JwksUrl(url, ALLOWED, clock=clock)  # the default: system trust store
    trusting_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx))
    trusting = JwksUrl(url, ALLOWED, clock=clock, session=trusting_session)
    try:
        assert await untrusting.get("k1") is None and untrusting.failures == 1
        assert await trusting.get("k1") is not None  # the same server, once its cert is trusted
    finally:
        await untrusting.close()
        await trusting.close()
        await trusting_session.close()


async def test_an_oversized_jwks_file_is_refused(tmp_path: Path, rsa_key: Any, clock: FakeClock) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1")], "pad": " " * 5000}))
    assert await JwksFile(path, ALLOWED, max_bytes=4096, clock=clock).get("k1") is None
    assert await JwksFile(path, ALLOWED, max_bytes=8192, clock=clock).get("k1") is not None


# ---- rotation and withdrawal, with the verified-token cache -------------------------------------
async def test_a_withdrawn_key_voids_cached_tokens_at_the_next_refresh(
        rsa_key: Any, other_rsa_key: Any, clock: FakeClock) -> None:
    source = DocSource({"keys": [public_jwk(rsa_key, "k1")]}, clock, cooldown=30, ttl=600)
    v = verifier_for(source)  # cache on, cache_max_ttl 1 h
    old = sign(rsa_key, claims())
    assert (await v.authenticate(old)).account == "acct-1"
    # The provider rotates: k1 is withdrawn (say it leaked), k2 replaces it.
    source.doc = {"keys": [public_jwk(other_rsa_key, "k2")]}
    clock.advance(31)
    assert (await v.authenticate(old)).account == "acct-1"  # cached; no refresh has happened yet
    assert (await v.authenticate(sign(other_rsa_key, claims(), kid="k2"))).account == "acct-1"
    with pytest.raises(InvalidToken, match="no key for kid"):  # well within the cache's max TTL
        await v.authenticate(old)


async def test_a_key_replaced_under_the_same_kid_voids_cached_tokens(
        rsa_key: Any, other_rsa_key: Any, clock: FakeClock) -> None:
    source = DocSource({"keys": [public_jwk(rsa_key, "k1"), public_jwk(rsa_key, "k0")]}, clock, ttl=60)
    v = verifier_for(source)
    old = sign(rsa_key, claims())
    await v.authenticate(old)
    source.doc = {"keys": [public_jwk(other_rsa_key, "k1"), public_jwk(rsa_key, "k0")]}
    clock.advance(61)
    assert await source.refresh()  # the refresh timer's round, past the ttl
    with pytest.raises(InvalidToken, match="InvalidSignatureError"):
        await v.authenticate(old)


async def test_a_new_key_does_not_void_the_cache(rsa_key: Any, other_rsa_key: Any, clock: FakeClock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    source = DocSource({"keys": [public_jwk(rsa_key, "k1")]}, clock)
    v = verifier_for(source)
    token = sign(rsa_key, claims())
    await v.authenticate(token)
    source.doc = {"keys": [public_jwk(rsa_key, "k1"), public_jwk(other_rsa_key, "k2")]}
    clock.advance(31)
    await v.authenticate(sign(other_rsa_key, claims(), kid="k2"))
    assert source.revision == 0

    async def no_verify(token: str) -> Any:
        raise AssertionError("cache miss")

    monkeypatch.setattr(v, "_verify", no_verify)
    assert (await v.authenticate(token)).account == "acct-1"
