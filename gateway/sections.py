"""The feature sections of the gateway config and the parser that owns each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.yamlsource import Node


def section_parsers() -> dict[str, Callable[[Node | None], Any]]:
    """Config section name → parser of that section (given None when the section is absent)."""
    from gateway.geo.config import parse_geoip_config
    from gateway.identity.config import parse_identity_config
    from gateway.stages.client_ip import parse_client_ip_config

    return {
        "identity": parse_identity_config,
        "client_ip": parse_client_ip_config,
        "geoip": parse_geoip_config,
    }
