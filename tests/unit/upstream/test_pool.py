"""The pooled upstream client against real sockets: keep-alive reuse, the pool bound, timeouts,
connections that must not be reused, and the request bytes it writes."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from gateway.settings import UpstreamSettings
from gateway.upstream.base import UpstreamConnectError
from gateway.upstream.pool import PooledUpstream
from tests.support.raw_upstream import Exchange, RawFactory


def _ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (len(body), extra, body))


def _upstream(port: int, **kw: float | int | str) -> PooledUpstream:
    settings = UpstreamSettings(name="t", base_url=str(kw.pop("base_url", f"http://127.0.0.1:{port}")),
                                **kw)  # type: ignore[arg-type]
    return PooledUpstream(settings)


HEADERS = CIMultiDict({"Content-Type": "application/json", "X-Request-Id": "r1"})


async def _one(upstream: PooledUpstream) -> int:
    async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
        await response.read()
        return response.status


async def test_sequential_requests_reuse_one_connection(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(_ok())
        return True

    server = await raw_upstream(respond)
    upstream = _upstream(server.port)
    try:
        for _ in range(5):
            async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                assert response.content_length == 12
                assert await response.read() == b'{"ok": true}'
        assert server.connections == 1
        assert len(server.requests) == 5
    finally:
        await upstream.close()


async def test_request_bytes_carry_prefix_host_and_length(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(_ok())
        await ex.writer.drain()
        return False

    server = await raw_upstream(respond)
    upstream = _upstream(server.port, base_url=f"http://127.0.0.1:{server.port}/openai/")
    try:
        async with upstream.request("POST", "/v1/chat/completions?x=1", HEADERS, b'{"a":1}') as response:
            await response.read()
    finally:
        await upstream.close()
    sent = server.requests[0].head + server.requests[0].body
    assert sent.startswith(b"POST /openai/v1/chat/completions?x=1 HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n".encode() in sent
    assert b"Content-Length: 7\r\n" in sent
    assert b"X-Request-Id: r1\r\n" in sent
    assert sent.endswith(b'\r\n\r\n{"a":1}')


async def test_a_header_value_with_a_line_break_is_refused(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        return False

    server = await raw_upstream(respond)
    upstream = _upstream(server.port)
    try:
        with pytest.raises(ValueError, match="line break"):
            async with upstream.request("POST", "/v1/x", CIMultiDict({"X-A": "a\r\nX-Injected: 1"}), b"{}"):
                pass
        assert server.connections == 0
    finally:
        await upstream.close()


async def test_pool_bound_holds_under_concurrency(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        await asyncio.sleep(0.02)
        ex.writer.write(_ok())
        return True

    server = await raw_upstream(respond)
    upstream = _upstream(server.port, pool_size=2)

    try:
        statuses = await asyncio.gather(*(_one(upstream) for _ in range(12)))
        assert statuses == [200] * 12
        assert server.most_open <= 2
        assert server.connections == 2
    finally:
        await upstream.close()


async def test_cancelled_waiter_does_not_leak_a_slot(raw_upstream: RawFactory) -> None:
    release = asyncio.Event()

    async def respond(ex: Exchange) -> bool:
        await release.wait()
        ex.writer.write(_ok())
        return True

    server = await raw_upstream(respond)
    upstream = _upstream(server.port, pool_size=1)

    try:
        first = asyncio.create_task(_one(upstream))
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(_one(upstream))
        await asyncio.sleep(0.05)
        waiter.cancel()
        release.set()
        assert await first == 200
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await asyncio.wait_for(_one(upstream), 2) == 200  # the slot is still usable
    finally:
        await upstream.close()


async def test_unread_body_closes_the_connection(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return True  # the stream never ends by itself

    server = await raw_upstream(respond)
    upstream = _upstream(server.port)
    try:
        async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert await response.content.readany() == b"hello"
        async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert await response.content.readany() == b"hello"
        assert server.connections == 2  # the half-read stream was not handed to the next request
        for _ in range(50):
            if server.open_now == 0:
                break
            await asyncio.sleep(0.01)
        assert server.open_now == 0  # and leaving the context closed it (the model stops)
    finally:
        await upstream.close()


async def test_chunked_and_close_delimited_bodies(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
            return True
        ex.writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await ex.writer.drain()
        return False

    server = await raw_upstream(respond)
    upstream = _upstream(server.port)
    try:
        async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert response.content_length is None
            assert response.content_type == "application/octet-stream"
            assert await response.read() == b"abcdefg"
        async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert await response.read() == b"until the end"
        async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert await response.read() == b"until the end"
        assert server.connections == 2  # reused after the chunked body, not after close
    finally:
        await upstream.close()


async def test_silent_upstream_times_out(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        await asyncio.sleep(10)
        return False

    server = await raw_upstream(respond)
    upstream = _upstream(server.port, read_timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(aiohttp.ServerTimeoutError):
            async with upstream.request("POST", "/v1/x", HEADERS, b"{}"):
                pass
        assert time.monotonic() - started < 1.0
    finally:
        await upstream.close()


async def test_silence_mid_body_times_out_the_read(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await ex.writer.drain()
        await asyncio.sleep(10)
        return False

    server = await raw_upstream(respond)
    upstream = _upstream(server.port, read_timeout=0.2)
    try:
        async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert await response.content.readany() == b"abc"
            with pytest.raises(aiohttp.ServerTimeoutError):
                await response.content.readany()
    finally:
        await upstream.close()


async def test_idle_connection_closed_by_the_server_is_replaced(raw_upstream: RawFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(_ok())
        await ex.writer.drain()
        return False  # then close: the server's keep-alive timeout, at once

    server = await raw_upstream(respond)
    upstream = _upstream(server.port)
    try:
        for _ in range(3):
            async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
                assert await response.read() == b'{"ok": true}'
            await asyncio.sleep(0.05)  # the FIN arrives while the connection idles in the pool
        assert server.connections == 3
    finally:
        await upstream.close()


async def test_refused_connection_raises_a_connect_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    upstream = _upstream(port)
    try:
        with pytest.raises(UpstreamConnectError):
            async with upstream.request("POST", "/v1/x", HEADERS, b"{}"):
                pass
        with pytest.raises(UpstreamConnectError):  # and the failed attempt gave its slot back
            async with upstream.request("POST", "/v1/x", HEADERS, b"{}"):
                pass
    finally:
        await upstream.close()


def test_base_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        _upstream(0, base_url="ftp://example.com")


async def test_a_complete_response_held_past_the_read_timeout_is_still_readable(
        raw_upstream: RawFactory) -> None:
    async def respond(ex: Exchange) -> bool:
        ex.writer.write(_ok())
        await ex.writer.drain()
        await asyncio.sleep(10)  # the connection stays open and silent
        return False

    server = await raw_upstream(respond)
    upstream = _upstream(server.port, read_timeout=0.1)
    try:
        async with upstream.request("POST", "/v1/x", HEADERS, b"{}") as response:
            await asyncio.sleep(0.4)  # a tarpit holding the response before relaying it
            assert await response.read() == b'{"ok": true}'
    finally:
        await upstream.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_upstream_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert_path, key_path = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(_ok())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(respond, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        untrusted = _upstream(port, base_url=f"https://localhost:{port}")
        try:
            with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                async with untrusted.request("POST", "/v1/x", HEADERS, b"{}"):
                    pass
        finally:
            await untrusted.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))  # the operator's trust store
        trusted = _upstream(port, base_url=f"https://localhost:{port}")
        try:
            async with trusted.request("POST", "/v1/x", HEADERS, b"{}") as response:
                assert response.status == 200 and await response.read() == b'{"ok": true}'
        finally:
            await trusted.close()
    finally:
        server.close()


async def test_the_installed_aiohttp_still_has_the_internals_the_sweeper_reads() -> None:
    """The read-timeout sweeper reads ResponseHandler's ``_payload`` and ``_reading_paused``
    (whether a body is complete, whether the pause is backpressure). It reads them defensively,
    but an aiohttp that renamed them would lose those two exceptions silently: fail here first."""
    from gateway.upstream.pool import _Connection

    conn = _Connection(asyncio.get_running_loop())
    assert conn._payload is None  # no response yet
    assert conn._reading_paused is False
