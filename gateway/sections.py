"""The feature sections of the gateway config and the parser that owns each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.yamlsource import Node


def section_parsers() -> dict[str, Callable[[Node | None], Any]]:
    """Config section name → parser of that section (given None when the section is absent)."""
    from gateway.geo.config import parse_geoip_config
    from gateway.identity.config import parse_identity_config
    from gateway.risk.settings import parse_risk_settings
    from gateway.stages.client_ip import parse_client_ip_config

    return {
        "identity": parse_identity_config,
        "client_ip": parse_client_ip_config,
        "geoip": parse_geoip_config,
        "risk": parse_risk_settings,
    }


def root_section_parsers() -> dict[str, tuple[frozenset[str], Callable[[Node], Any]]]:
    """Parsers that read several top-level sections at once: name → (keys they own, parser)."""
    from gateway.quota.settings import parse_quota_settings

    return {"quota": (frozenset({"store", "quota"}), parse_quota_settings)}
