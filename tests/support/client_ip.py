"""Client IP resolution as the unit tests drive it: a context from a peer and headers, the stage
over a fixed set of trusted proxies, and the ``client_ip`` config section parsed from YAML."""

from __future__ import annotations

import ipaddress

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.ipaddr import CidrSet
from gateway.stages.client_ip import ClientIpConfig, ClientIpStage, parse_client_ip_config
from gateway.yamlsource import Issues, Node

ip = ipaddress.ip_address
PROXIES = CidrSet.parse(["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"])


def make_ctx(peer: str | None, headers: list[tuple[str, str]] = ()) -> RequestContext:  # type: ignore[assignment]
    view = RequestView(api=ApiFamily.OPENAI, route="chat.completions", path="/v1/chat/completions",
                       method="POST", headers=CIMultiDictProxy(CIMultiDict(headers)))
    ctx = RequestContext(request_id="r1", request=view)
    ctx.client.peer_ip = ip(peer) if peer else None
    return ctx


async def resolve(peer: str | None, headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
                  stage: ClientIpStage | None = None) -> RequestContext:
    stage = stage or ClientIpStage(PROXIES, headers=("x-forwarded-for", "forwarded"))
    ctx = make_ctx(peer, headers)
    assert await stage(ctx) is None
    return ctx


def parse(text: str) -> tuple[ClientIpConfig, Issues]:
    issues = Issues()
    root = Node.parse(text, "gw.yaml", issues)
    assert root is not None
    return parse_client_ip_config(root.child("client_ip")), issues
