"""Bad input, header hygiene and disconnects, driven with a raw HTTP client."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.headers import client_response_headers
from gateway.upstream.mock_server import MockOptions, MockServer, serve_mock
from tests.conftest import GatewayFactory
from tests.support.gateway import CLIENT_KEY, RunningGateway

CHAT = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


async def post(
    gw: RunningGateway, path: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object], CIMultiDictProxy[str]]:
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=data, headers=headers) as r:
        return r.status, await r.json(), r.headers


@pytest.mark.parametrize(
    ("data", "headers", "status", "text"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
        (b"\xff\xfe\x00{}", {"Content-Type": "application/json"}, 400, "not valid UTF-8"),
        (BODY, {"Content-Type": "text/plain"}, 400, "Content-Type must be application/json"),
        (b"[1, 2]", {"Content-Type": "application/json"}, 400, "must be a JSON object"),
        (b"", {"Content-Type": "application/json"}, 400, "body is empty"),
        (
            b'{"model": "m", "stream": "yes"}',
            {"Content-Type": "application/json"},
            400,
            "'stream' must be a boolean",
        ),
        (b'{"model": "m", "n": true}', {"Content-Type": "application/json"}, 400, "'n' must be an integer"),
        (
            b'{"model": "m", "stream": true, "stream_options": "yes", "messages": []}',
            {"Content-Type": "application/json"},
            400,
            "'stream_options' must be an object",
        ),
        (b"[" * 100_000, {"Content-Type": "application/json"}, 400, "nested too deeply"),
    ],
)
async def test_bad_bodies_get_openai_shaped_errors(
    gateway: RunningGateway, data: bytes, headers: dict[str, str], status: int, text: str
) -> None:
    got, body, resp_headers = await post(gateway, CHAT, data, headers)
    assert got == status
    error = body["error"]
    assert isinstance(error, dict) and text in error["message"]
    assert resp_headers["x-should-retry"] == "false"


async def test_anthropic_route_errors_use_anthropic_shape(gateway: RunningGateway) -> None:
    got, body, _ = await post(gateway, "/v1/messages", b"{oops", {"Content-Type": "application/json"})
    assert got == 400 and body["type"] == "error"


async def test_oversized_chunked_body_is_refused(mock_upstream: MockServer, start_gateway) -> None:  # type: ignore[no-untyped-def]
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1024

    async with start_gateway(mock_upstream.url, "max_body_bytes: 8KiB\n") as gw:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                gw.url + CHAT,
                data=chunks(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"},
            ) as r,
        ):
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "request_too_large"


async def test_wrong_method_and_unknown_route(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + CHAT) as r:
            assert r.status == 405 and "not allowed" in (await r.json())["error"]["message"]
            assert r.headers["Allow"] == "POST"
        async with s.post(gateway.url + "/v1/models", data=b"{}") as r:
            assert r.status == 405 and r.headers["Allow"] == "GET, HEAD"
            assert "error" in await r.json()
        # the path both APIs define refuses an Anthropic client in its grammar
        async with s.post(gateway.url + "/v1/models", data=b"{}",
                          headers={"anthropic-version": "2023-06-01"}) as r:
            assert r.status == 405 and (await r.json())["error"]["type"] == "invalid_request_error"
            assert (await r.json())["type"] == "error"
        async with s.head(gateway.url + CHAT) as r:
            assert r.status == 405 and r.headers["Allow"] == "POST"
        async with s.post(gateway.url + "/v2/whatever", data=b"{}") as r:
            assert r.status == 404


async def test_head_on_models_is_get_without_a_body(
        gateway: RunningGateway, mock_upstream: MockServer) -> None:
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/v1/models", headers=auth) as r:
            assert r.status == 200
            listed = await r.read()
        async with s.head(gateway.url + "/v1/models", headers=auth) as r:
            status, headers, body = r.status, r.headers, await r.read()
        async with s.head(gateway.url + "/v1/models", headers={"Authorization": "Bearer tg_wrong"}) as r:
            refused_status, refused_headers, refused_body = r.status, r.headers, await r.read()
    assert status == 200 and body == b""
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(listed)  # the GET's length, as RFC 9110 allows
    assert headers["x-request-id"]
    # the upstream is asked with GET: one that answers only GET on the path still serves HEAD
    assert [r.method for r in mock_upstream.state.requests] == ["GET", "GET"]
    # an error answers HEAD as it would GET, still without the body
    assert refused_status == 401 and refused_body == b""
    assert refused_headers["x-should-retry"] == "false"
    records = (await gateway.access_records())[-3:]
    assert [(r["method"], r["route"], r["status"]) for r in records] == [
        ("GET", "models", 200), ("HEAD", "models", 200), ("HEAD", "models", 401)]


async def test_client_credentials_and_hop_by_hop_headers_never_reach_upstream(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLGATE_TEST_PROVIDER_KEY", "sk-provider-secret")
    async with (
        serve_mock(MockOptions(api_key="sk-provider-secret")) as upstream,
        start_gateway(upstream.url, upstream_extra="api_key_env: TOLLGATE_TEST_PROVIDER_KEY") as gw,
    ):
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {CLIENT_KEY}",
            "x-api-key": CLIENT_KEY,
            "Connection": "keep-alive, x-private-hop",
            "x-private-hop": "must-not-pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "Cookie": "session=1",
            "X-Forwarded-For": "203.0.113.9",
            "x-custom-ok": "passes",
        }
        status, _, _ = await post(gw, CHAT, BODY, headers)
        assert status == 200
        seen = {k.lower(): v for k, v in upstream.state.requests[-1].headers.items()}
    assert seen["authorization"] == "Bearer sk-provider-secret"
    assert CLIENT_KEY not in " ".join(seen.values())
    for name in (
        "x-api-key",
        "x-private-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "cookie",
        "x-forwarded-for",
    ):
        assert name not in seen, name
    assert seen["x-custom-ok"] == "passes"
    assert seen["x-request-id"]


async def test_anthropic_credential_goes_in_x_api_key(start_gateway, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TOLLGATE_TEST_PROVIDER_KEY", "sk-ant-provider")
    async with (
        serve_mock(MockOptions(api_key="sk-ant-provider")) as upstream,
        start_gateway(upstream.url, upstream_extra="api_key_env: TOLLGATE_TEST_PROVIDER_KEY") as gw,
    ):
        status, _, _ = await post(
            gw,
            "/v1/messages",
            b'{"model":"c","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}',
            {"Content-Type": "application/json", "x-api-key": CLIENT_KEY},
        )
        assert status == 200
        seen = {k.lower(): v for k, v in upstream.state.requests[-1].headers.items()}
    assert seen["x-api-key"] == "sk-ant-provider" and "authorization" not in seen


async def test_client_disconnect_cancels_the_upstream_stream_promptly(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with (
        serve_mock(MockOptions(chunks=200, chunk_delay=0.05)) as upstream,
        start_gateway(upstream.url) as gw,
    ):
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
        session = aiohttp.ClientSession()
        resp = await session.post(
            gw.url + CHAT,
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert resp.status == 200
        await resp.content.readline()  # the stream is flowing
        resp.close()  # the client goes away mid-stream
        closed_at = time.monotonic()
        await session.close()
        deadline = closed_at + 2.0
        while upstream.state.streams_cancelled == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert upstream.state.streams_cancelled == 1
        assert upstream.state.cancel_times[-1] - closed_at < 0.1
        await asyncio.sleep(0.05)
        record = (await gw.access_records())[-1]
    assert record["status"] == 499 and record["client_disconnected"] is True
    assert gw.runtime.metrics.active_streams.value == 0


async def test_first_byte_is_not_delayed_by_a_slow_stream(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with (
        serve_mock(MockOptions(chunks=5, chunk_delay=0.2)) as upstream,
        start_gateway(upstream.url) as gw,
    ):
        body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
        async with aiohttp.ClientSession() as s:
            started = time.monotonic()
            async with s.post(
                gw.url + CHAT,
                data=body,
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"},
            ) as r:
                first = await r.content.readline()
                first_at = time.monotonic() - started
                rest = await r.read()
                total = time.monotonic() - started
    assert first.startswith(b"data: ")
    # Relayed as it arrives (before the first 200 ms delta delay), not after the whole second.
    assert total > 0.9 and first_at < total / 3
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_stream_headers_are_not_held_back_while_the_model_thinks(start_gateway) -> None:  # type: ignore[no-untyped-def]
    """An upstream that sends its headers, then thinks: the client gets the headers at once
    (headers only wait for events that arrived together with the upstream's)."""

    async def thinking(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.5)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n')
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT, thinking)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with start_gateway(f"http://127.0.0.1:{port}") as gw, aiohttp.ClientSession() as s:
            started = time.monotonic()
            async with s.post(gw.url + CHAT, data=b'{"model":"m","stream":true,"messages":[]}', headers={
                    "Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}) as r:
                headers_at = time.monotonic() - started
                body = await r.read()
                total = time.monotonic() - started
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert headers_at < 0.35 < 0.5 <= total
        assert body.endswith(b"data: [DONE]\n\n")
    finally:
        await runner.cleanup()


async def test_healthz_and_readyz(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(gateway.url + "/readyz") as r:
            body = await r.json()
            assert r.status == 200 and body["ready"] is True and body["upstreams"] == {"mock": True}


async def test_compressed_body_goes_upstream_decoded_and_account_headers_stay(
    mock_upstream: MockServer, start_gateway: GatewayFactory
) -> None:
    async with start_gateway(mock_upstream.url) as gw:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
                   "OpenAI-Organization": "org-someone-else", "OpenAI-Project": "proj_other",
                   "True-Client-IP": "6.6.6.6"}
        status, body, _ = await post(gw, CHAT, gzip.compress(BODY), headers)
        assert status == 200, body
        seen = mock_upstream.state.requests[-1]
    assert seen.body == orjson.loads(BODY)  # the JSON the client compressed, sent as plain JSON
    for name in ("content-encoding", "openai-organization", "openai-project", "true-client-ip"):
        assert name not in seen.headers, name


async def test_compressed_body_is_bounded_after_decoding(
    mock_upstream: MockServer, start_gateway: GatewayFactory
) -> None:
    bomb = gzip.compress(b'{"model":"m","messages":[],"pad":"' + b" " * 64 * 1024 * 1024 + b'"}')
    assert len(bomb) < 128 * 1024
    async with start_gateway(mock_upstream.url, "max_body_bytes: 1MiB\n") as gw:
        status, body, _ = await post(gw, CHAT, bomb, {"Content-Type": "application/json",
                                                      "Content-Encoding": "gzip"})
        assert status == 413, body
        before = len(mock_upstream.state.requests)
        status, _, _ = await post(gw, CHAT, BODY, {"Content-Type": "application/json"})
        assert status == 200  # the gateway is fine afterwards
    assert len(mock_upstream.state.requests) == before + 1


def test_provider_account_headers_do_not_reach_the_client() -> None:
    upstream = CIMultiDictProxy(CIMultiDict({
        "Content-Type": "application/json", "openai-organization": "provider-org",
        "openai-project": "proj_provider", "anthropic-organization-id": "org-uuid",
        "x-request-id": "up-1", "x-ratelimit-limit-tokens": "30000000",
        "anthropic-ratelimit-requests-remaining": "3999", "RateLimit": '"p";r=1;t=1',
        "RateLimit-Policy": '"p";q=4000;w=60', "Retry-After": "2"}))
    out = client_response_headers(upstream)
    # The provider account's limits are not the client's; a provider's Retry-After still is.
    assert dict(out) == {"Content-Type": "application/json", "x-request-id": "up-1", "Retry-After": "2"}


async def test_credentials_are_checked_before_the_body_is_read(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as s:
        # no key: refused as unauthenticated, not told how the body would have been validated
        headers = {"Content-Type": "application/json"}
        async with s.post(gateway.url + CHAT, data=b"{not json", headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
    # A client announcing a body it never sends gets its 401 at once, without the gateway waiting.
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100000\r\n\r\n{".encode())
    await writer.drain()
    async with asyncio.timeout(5):
        status_line = await reader.readline()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 401"), status_line
