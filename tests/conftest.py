"""Shared fixtures: a real mock upstream and a real gateway on loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from gateway.upstream.mock_server import MockOptions, MockServer, serve_mock
from tests.support.gateway import RunningGateway, gateway_yaml, run_gateway

GatewayFactory = Callable[..., AbstractAsyncContextManager[RunningGateway]]


@pytest.fixture
async def mock_upstream() -> AsyncIterator[MockServer]:
    async with serve_mock(MockOptions(chunks=6)) as server:
        yield server


@pytest.fixture
def start_gateway(tmp_path: Path) -> GatewayFactory:
    """``async with start_gateway(upstream_url, extra_yaml) as gw`` runs a gateway on a free port."""

    def factory(upstream_url: str, extra: str = "", upstream_extra: str = "") -> AbstractAsyncContextManager[
            RunningGateway]:
        return run_gateway(gateway_yaml(upstream_url, tmp_path, extra, upstream_extra), tmp_path)

    return factory


@pytest.fixture(params=["pool", "session"])
async def gateway(request: pytest.FixtureRequest, mock_upstream: MockServer,
                  start_gateway: GatewayFactory) -> AsyncIterator[RunningGateway]:
    """A gateway on each upstream client (gateway/upstream/pool.py and aiohttp's ClientSession):
    every test using it holds for both."""
    async with start_gateway(mock_upstream.url, upstream_extra=f"client: {request.param}") as gw:
        yield gw
