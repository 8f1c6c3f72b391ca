"""``GET /v1/models`` and ``GET /v1/models/{id}`` are both APIs' paths: each SDK's request goes to
the upstream serving its own API, with that API's credential header, and comes back in its shape.
Two mock upstreams (one per API, each requiring its own provider key) and the official SDKs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import openai
import pytest

from gateway.upstream.mock_server import MockOptions, MockServer, serve_mock
from tests.support.gateway import CLIENT_KEY, RunningGateway, run_gateway, write_keys_file

OPENAI_PROVIDER_KEY = "sk-provider-openai"
ANTHROPIC_PROVIDER_KEY = "sk-ant-provider"


def config(tmp: Path, upstreams: list[tuple[str, MockServer, str]]) -> str:
    lines = ["listen: {host: 127.0.0.1, port: 0}", "admin: {enabled: false}", "upstreams:"]
    for api, server, env in upstreams:
        lines += [f"  - name: {api}", f"    base_url: {server.url}", f"    api: {api}",
                  f"    api_key_env: {env}"]
    lines += ["logging:", f"  access_log: {tmp / 'access.jsonl'}", "  audit_log: null",
              f"identity: {{keys_file: {write_keys_file(tmp)}}}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def providers(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[MockServer, MockServer]]:
    monkeypatch.setenv("TG_TEST_OPENAI_KEY", OPENAI_PROVIDER_KEY)
    monkeypatch.setenv("TG_TEST_ANTHROPIC_KEY", ANTHROPIC_PROVIDER_KEY)
    async with serve_mock(MockOptions(api_key=OPENAI_PROVIDER_KEY)) as oai, \
            serve_mock(MockOptions(api_key=ANTHROPIC_PROVIDER_KEY)) as ant:
        yield oai, ant


@pytest.fixture
async def gw(providers: tuple[MockServer, MockServer], tmp_path: Path) -> AsyncIterator[RunningGateway]:
    oai, ant = providers
    text = config(tmp_path, [("openai", oai, "TG_TEST_OPENAI_KEY"),
                             ("anthropic", ant, "TG_TEST_ANTHROPIC_KEY")])
    async with run_gateway(text, tmp_path) as running:
        yield running


async def test_each_sdk_lists_and_retrieves_models_from_its_own_upstream(
        gw: RunningGateway, providers: tuple[MockServer, MockServer]) -> None:
    oai, ant = providers
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as o_client, \
            anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as a_client:
        o_models = [m.id async for m in o_client.models.list()]
        a_models = [m.id async for m in a_client.models.list()]
        o_one = await o_client.models.retrieve(o_models[0])
        a_one = await a_client.models.retrieve(a_models[0])
        with pytest.raises(anthropic.NotFoundError):
            await a_client.models.retrieve("no-such-model")
    assert o_one.id == o_models[0] and o_one.object == "model"
    assert a_one.id == a_models[0] and a_one.type == "model"
    seen_o = [(r.path, r.headers) for r in oai.state.requests]
    seen_a = [(r.path, r.headers) for r in ant.state.requests]
    assert [p for p, _ in seen_o] == ["/v1/models", f"/v1/models/{o_models[0]}"]
    assert [p for p, _ in seen_a] == ["/v1/models", f"/v1/models/{a_models[0]}", "/v1/models/no-such-model"]
    # each provider got its own credential in its own header, and never the client's gateway key
    for _, headers in seen_o:
        assert headers["authorization"] == f"Bearer {OPENAI_PROVIDER_KEY}" and "x-api-key" not in headers
    for _, headers in seen_a:
        assert headers["x-api-key"] == ANTHROPIC_PROVIDER_KEY and "authorization" not in headers
        assert headers["anthropic-version"]
    assert all(CLIENT_KEY not in str(h) for _, h in seen_o + seen_a)


async def test_an_api_without_an_upstream_is_not_served_in_its_own_shape(
        providers: tuple[MockServer, MockServer], tmp_path: Path) -> None:
    oai, _ = providers
    async with run_gateway(config(tmp_path, [("openai", oai, "TG_TEST_OPENAI_KEY")]), tmp_path) as gw, \
            anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as a_client:
        with pytest.raises(anthropic.NotFoundError) as refused:
            await a_client.models.list()
    assert refused.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "No upstream serves the anthropic API's /v1/models here."}}
    assert not oai.state.requests  # never sent to the other API's provider
