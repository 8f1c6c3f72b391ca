"""Header hygiene between client, gateway and upstream (RFC 9110 §7.6.1)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import ApiFamily

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization",
})
# The client's gateway credentials and what the gateway itself sets: never forwarded.
# Content-Encoding: aiohttp has already decoded a compressed body, and the body goes upstream as
# read. OpenAI-Organization/-Project choose the provider account a request bills to: that is the
# gateway's upstream credential's business, not the client's. The request id upstream is the
# gateway's (X-Request-Id, set below); a client's own id is audited as client_request_id.
CLIENT_ONLY = frozenset({
    "authorization", "x-api-key", "api-key", "cookie", "host", "content-length", "content-encoding",
    "accept-encoding", "x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-host",
    "x-forwarded-proto", "true-client-ip", "cf-connecting-ip", "x-client-ip",
    "openai-organization", "openai-project", "x-tollgate-challenge", "x-tollgate-solution",
    "x-request-id", "request-id",
})
# The provider account behind the gateway's upstream credential is not the client's to see:
# neither its identity nor its rate limits (the shared account's limits would mislead every client;
# the quota stage sets Tollgate's own). Retry-After stays: a provider 429 must still slow the SDK.
UPSTREAM_ONLY = frozenset({"content-length", "content-encoding", "server", "date", "set-cookie",
                           "openai-organization", "openai-project", "anthropic-organization-id",
                           "ratelimit", "ratelimit-policy"})
UPSTREAM_ONLY_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


def connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    """Header names listed in ``Connection``: hop-by-hop by declaration."""
    tokens: set[str] = set()
    getall = getattr(headers, "getall", None)
    values: Iterable[str] = getall("Connection", ()) if getall else [headers.get("Connection", "")]
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _filtered(headers: CIMultiDictProxy[str], drop: frozenset[str],
              drop_prefixes: tuple[str, ...] = ()) -> CIMultiDict[str]:
    """``headers`` minus ``drop``, names starting with ``drop_prefixes``, hop-by-hop fields and
    the fields named in ``Connection``."""
    declared = connection_tokens(headers) if "Connection" in headers else ()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop or lower in declared:
            continue
        if drop_prefixes and lower.startswith(drop_prefixes):
            continue
        out.add(name, value)
    return out


def upstream_request_headers(client: CIMultiDictProxy[str], api: ApiFamily, credential: str | None,
                             request_id: str) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop and gateway credentials, plus the provider credential."""
    out = _filtered(client, CLIENT_ONLY)
    out["Content-Type"] = "application/json"
    out["Accept-Encoding"] = "identity"
    out["X-Request-Id"] = request_id
    if credential:
        if api is ApiFamily.ANTHROPIC:
            out["x-api-key"] = credential
        else:
            out["Authorization"] = f"Bearer {credential}"
    return out


def client_response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Upstream response headers a client may see."""
    return _filtered(upstream, UPSTREAM_ONLY, UPSTREAM_ONLY_PREFIXES)
