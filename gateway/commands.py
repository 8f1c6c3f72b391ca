"""Feature subcommands of the ``gateway`` CLI (policy, keys, solve, friction...)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def feature_commands() -> list[Callable[[SubParsers], None]]:
    from gateway.friction.cli import add_friction_commands, add_solve_command
    from gateway.identity.keys_cli import add_keys_commands
    from gateway.policy.cli import add_policy_commands

    return [add_policy_commands, add_keys_commands, add_solve_command, add_friction_commands]
