"""The feature sections of the gateway config and the parser that owns each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.yamlsource import Node


def section_parsers() -> dict[str, Callable[[Node | None], Any]]:
    """Config section name → parser of that section (given None when the section is absent)."""
    return {}
