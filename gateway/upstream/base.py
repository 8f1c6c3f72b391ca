"""The upstream seam: send one request to the model service, get a streaming response."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import aiohttp
from multidict import CIMultiDict


class Upstream(Protocol):
    """A model service. ``request`` yields the response with its body still unread, so the
    caller can stream it; leaving the context closes (or cancels) the upstream request."""

    name: str

    def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]: ...

    async def close(self) -> None: ...
