"""Feature subcommands of the ``gateway`` CLI (policy, keys, solve, simulate...)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def feature_commands() -> list[Callable[[SubParsers], None]]:
    return []
