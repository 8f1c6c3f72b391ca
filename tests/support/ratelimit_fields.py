"""Reading the IETF rate-limit fields back in tests."""

from __future__ import annotations


def parse_structured(value: str) -> dict[str, dict[str, str]]:
    """``"rpm";q=3;w=60, "tpd";q=9`` → {"rpm": {"q": "3", "w": "60"}, ...}: enough for the
    ``RateLimit`` and ``RateLimit-Policy`` fields the gateway writes (no quoted commas)."""
    items: dict[str, dict[str, str]] = {}
    for member in value.split(", "):
        name, *params = member.split(";")
        items[name.strip('"')] = dict(p.split("=", 1) for p in params)
    return items
