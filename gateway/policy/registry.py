"""Extension points of the policy language: actions and matchers are added by registering them.

A later feature (quotas, friction) plugs into the language by registering an :class:`ActionSpec`
here at import time of its own module (``gateway.policy.builtin_actions`` imports the built-in
ones); the evaluator never changes. Registration happens through :func:`default_registry`, which
builds a fresh :class:`Registry` each call so there is no module-level mutable state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.yamlsource import Node


@dataclass(slots=True)
class CompileEnv:
    """What an action or matcher parser may consult while compiling.

    ``lists`` are the named lists defined in the policy set (name → tuple of raw string values),
    ``settings`` the gateway settings object (may be None in `policy check` without a config).
    """

    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    settings: Any = None


class ActionSpec(Protocol):
    """One kind of policy action (``allow``, ``deny``, ``tag``, ``quota``, ``friction``...).

    ``parse`` validates the YAML value under the action's key and returns an immutable compiled
    object, or ``None`` after reporting errors on ``node`` (``node.error(...)``). Terminal actions
    end evaluation (first match wins); non-terminal ones accumulate from every matching rule in
    file and rule order, in :attr:`gateway.policy.evaluate.Outcome.actions`.
    """

    name: str
    terminal: bool

    def parse(self, node: Node, env: CompileEnv) -> Any | None: ...


# A matcher compiles the operand of one operator into a predicate on the resolved field value.
MatcherFactory = Callable[[Node, CompileEnv], "Callable[[Any], bool] | None"]


@dataclass(slots=True)
class Registry:
    """Actions and operators known to the compiler."""

    actions: dict[str, ActionSpec] = field(default_factory=dict)
    operators: dict[str, MatcherFactory] = field(default_factory=dict)

    def add_action(self, spec: ActionSpec) -> None:
        if spec.name in self.actions:
            raise ValueError(f"action {spec.name!r} registered twice")
        self.actions[spec.name] = spec

    def add_operator(self, name: str, factory: MatcherFactory) -> None:
        if name in self.operators:
            raise ValueError(f"operator {name!r} registered twice")
        self.operators[name] = factory


@dataclass(frozen=True, slots=True)
class MatchedAction:
    """A non-terminal action contributed by one matching rule, in evaluation order.

    ``shadow`` is True when the rule (or the whole policy set) is in shadow mode: consumers must
    then only count and audit what they would have done, never act.
    """

    rule_id: str
    name: str  # the action key, e.g. "quota", "friction", "tag"
    value: Any  # what ActionSpec.parse returned
    shadow: bool = False
