"""The API families the gateway fronts."""

from __future__ import annotations

from gateway.apis.anthropic import AnthropicAdapter
from gateway.apis.base import ApiAdapter, RouteSpec
from gateway.apis.openai import OpenAIAdapter
from gateway.context import ApiFamily


def adapters() -> dict[ApiFamily, ApiAdapter]:
    return {ApiFamily.OPENAI: OpenAIAdapter(), ApiFamily.ANTHROPIC: AnthropicAdapter()}


def all_routes() -> tuple[RouteSpec, ...]:
    return tuple(r for a in adapters().values() for r in a.routes)
