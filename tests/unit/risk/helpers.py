"""Builders for risk and friction unit tests."""

from __future__ import annotations

import ipaddress
from typing import Any

from gateway.context import ApiFamily, Principal, RequestContext, RequestView


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def chat_ctx(text: str, *, account: str = "acct1", ip: str = "203.0.113.7", asn: int | None = 64500,
             system: str | None = None, history: int = 0, headers: dict[str, str] | None = None,
             **body: Any) -> RequestContext:
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for i in range(history):
        messages += [{"role": "user", "content": f"earlier {i}"}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": text})
    full = {"model": "m", "messages": messages, **body}
    view = RequestView(api=ApiFamily.OPENAI, route="chat.completions", path="/v1/chat/completions",
                       method="POST", headers=headers or {}, body=full, model="m",
                       max_tokens=body.get("max_tokens"), n=body.get("n", 1),
                       logprobs=bool(body.get("logprobs")))
    ctx = RequestContext(request_id="rid", request=view)
    ctx.principal = Principal(authenticated=True, account=account, tier="free")
    ctx.client.ip = ipaddress.ip_address(ip)
    ctx.client.asn = asn
    return ctx
