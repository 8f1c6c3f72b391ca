"""The minimal aiohttp pass-through: the floor of this stack for the load benchmark.

One uvloop event loop, one shared keep-alive ``ClientSession``; forwards method, path, query,
headers (minus hop-by-hop) and body to the upstream and relays the response, streaming chunks
as they arrive. No policy, no parsing, no logging.

    python bench/passthrough.py --port 8081 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

# RFC 9110 §7.6.1 hop-by-hop fields, plus the ones aiohttp recomputes for each leg.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
_UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)


def _forward_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    # A multidict keeps repeated fields (e.g. several set-cookie) that a dict would merge.
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP)


async def _proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[_SESSION]
    body = await request.read()
    async with session.request(
        request.method,
        request.app[_UPSTREAM] + request.path_qs,
        headers=_forward_headers(request.headers),
        data=body or None,
        allow_redirects=False,
    ) as upstream:
        headers = _forward_headers(upstream.headers)
        if upstream.content_length is not None:  # a sized body: one read, one write
            return web.Response(status=upstream.status, headers=headers, body=await upstream.read())
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_read=300),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    ) as session:
        app[_SESSION] = session
        yield


def create_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[_UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_route("*", "/{tail:.*}", _proxy)
    return app


async def _serve(host: str, port: int, upstream: str) -> None:
    # handler_cancellation: a client that goes away cancels the upstream request, as in the gateway
    runner = web.AppRunner(create_app(upstream), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
