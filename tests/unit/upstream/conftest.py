"""Fixtures of the upstream tests: a mock server and both official SDK clients on it, and raw
upstreams that write the exact bytes a client test needs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.upstream.mock_server import MOCK_STATE, MockOptions, MockState, create_mock_app
from tests.support.raw_upstream import RawFactory, raw_upstreams

ServerFactory = Callable[..., Any]


@pytest.fixture
async def server(aiohttp_server: ServerFactory) -> TestServer:
    server: TestServer = await aiohttp_server(create_mock_app(MockOptions()))
    return server


@pytest.fixture
def state(server: TestServer) -> MockState:
    return server.app[MOCK_STATE]


@pytest.fixture
async def oai(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="sk-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def ant(server: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=str(server.make_url("")), api_key="sk-ant-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawFactory]:
    """``await raw_upstream(respond)`` starts a raw upstream, stopped after the test."""
    async with raw_upstreams() as start:
        yield start
