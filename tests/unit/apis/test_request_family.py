"""Whose grammar a request speaks: the route's, or the client's on a path both families define."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from gateway.apis import all_routes
from gateway.apis.base import request_family
from gateway.context import ApiFamily

ROUTES = {route.name: route for route in all_routes()}


def test_the_model_routes_are_the_only_ones_both_families_define() -> None:
    assert [route.name for route in ROUTES.values() if route.shared] == ["models", "models.retrieve"]


@pytest.mark.parametrize(("headers", "family"), [
    ({"anthropic-version": "2023-06-01", "x-api-key": "k"}, ApiFamily.ANTHROPIC),
    ({"Anthropic-Version": "2023-06-01", "Authorization": "Bearer k"}, ApiFamily.ANTHROPIC),
    # x-api-key alone is no sign: the gateway takes its keys there from any client
    ({"x-api-key": "k"}, ApiFamily.OPENAI),
    ({"Authorization": "Bearer k"}, ApiFamily.OPENAI),
])
def test_models_follows_the_anthropic_version_header(headers: dict[str, str], family: ApiFamily) -> None:
    assert request_family(ROUTES["models"], CIMultiDict(headers)) is family


def test_other_routes_keep_their_family_whatever_the_headers() -> None:
    anthropic_client = CIMultiDict({"anthropic-version": "2023-06-01"})
    assert request_family(ROUTES["chat.completions"], anthropic_client) is ApiFamily.OPENAI
    assert request_family(ROUTES["messages"], CIMultiDict()) is ApiFamily.ANTHROPIC
