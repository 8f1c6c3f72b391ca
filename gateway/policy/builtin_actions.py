"""The built-in actions (``allow``, ``deny``, ``tag``) and the registry builder.

Other features add actions by handing :class:`ActionSpec` objects to :func:`build_registry`,
or, without touching the caller, by exposing one from a module listed in
:data:`EXTENSION_MODULES` (``gateway.quota.action.QUOTA_ACTION``,
``gateway.friction.action.FRICTION_ACTION``), which :func:`default_registry` imports if present.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.context import Decision
from gateway.policy.registry import ActionSpec, CompileEnv, Registry
from gateway.yamlsource import Node

# (module, attribute) pairs probed by default_registry; a missing module is simply skipped.
EXTENSION_MODULES: tuple[tuple[str, str], ...] = (
    ("gateway.quota.action", "QUOTA_ACTION"),
    ("gateway.friction.action", "FRICTION_ACTION"),
)
# The neutral error kinds gateway.errors maps onto each API family's error body.
ERROR_TYPES = ("invalid_request", "authentication", "permission", "not_found", "request_too_large",
               "rate_limit", "api_error", "overloaded")
DEFAULT_DENY_STATUS = 403
DEFAULT_DENY_TYPE = "permission"
# Deliberately says nothing about why: naming the rule or the country tells an evader what to change.
DEFAULT_DENY_MESSAGE = "This request is not permitted."
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$")


@dataclass(frozen=True, slots=True)
class DenyResponse:
    """What a ``deny`` answers; unset fields fall back to ``settings.deny`` then built-ins."""

    status: int | None = None
    error_type: str | None = None
    message: str | None = None
    code: str | None = None

    def over(self, base: DenyResponse) -> DenyResponse:
        return DenyResponse(
            self.status if self.status is not None else base.status,
            self.error_type if self.error_type is not None else base.error_type,
            self.message if self.message is not None else base.message,
            self.code if self.code is not None else base.code,
        )

    def decision(self, rule_id: str | None) -> Decision:
        """A fresh Decision per request: Decision is mutable and must not be shared."""
        return Decision(
            status=self.status or DEFAULT_DENY_STATUS,
            error_type=self.error_type or DEFAULT_DENY_TYPE,
            message=self.message or DEFAULT_DENY_MESSAGE,
            rule_id=rule_id,
            code=self.code,
        )


BUILTIN_DENY = DenyResponse(DEFAULT_DENY_STATUS, DEFAULT_DENY_TYPE, DEFAULT_DENY_MESSAGE, None)


@dataclass(slots=True)  # not frozen: ActionSpec declares writable attributes
class AllowAction:
    """``allow: true`` — ends evaluation with an allow decision."""

    name: str = "allow"
    terminal: bool = True

    def parse(self, node: Node, env: CompileEnv) -> Any | None:
        if node.as_type(bool) is None:
            return None
        if node.value is not True:
            node.error("'allow' takes true, expected 'allow: true' (remove the key to not allow)")
            return None
        return True


def parse_deny(node: Node) -> DenyResponse | None:
    """``true`` or a mapping of status / error_type / message / code."""
    if node.value is True:
        return DenyResponse()
    if not node.is_mapping:
        node.error("expected true or a mapping with status, error_type, message, code, "
                   f"got {type(node.value).__name__ if node.value is not None else 'nothing (null)'}")
        return None
    node.check_keys({"status", "error_type", "message", "code"})
    status = node.get("status", int)
    if status is not None and not 400 <= status <= 599:
        child = node.child("status")
        assert child is not None
        child.error(f"status {status} is not an error, expected an HTTP status from 400 to 599")
        status = None
    error_type = node.get("error_type", str)
    if error_type is not None and error_type not in ERROR_TYPES:
        child = node.child("error_type")
        assert child is not None
        child.error(f"unknown error_type '{error_type}', expected one of: {', '.join(ERROR_TYPES)}")
        error_type = None
    return DenyResponse(status, error_type, node.get("message", str), node.get("code", str))


@dataclass(slots=True)  # not frozen: ActionSpec declares writable attributes
class DenyAction:
    """``deny: true`` or ``deny: {status, error_type, message, code}`` — ends evaluation."""

    name: str = "deny"
    terminal: bool = True

    def parse(self, node: Node, env: CompileEnv) -> Any | None:
        return parse_deny(node)


@dataclass(slots=True)  # not frozen: ActionSpec declares writable attributes
class TagAction:
    """``tag: name`` or ``tag: [a, b]`` — labels for the audit record and later rules."""

    name: str = "tag"
    terminal: bool = False

    def parse(self, node: Node, env: CompileEnv) -> Any | None:
        items = list(node.elements()) if node.is_list else [node]
        tags: list[str] = []
        for item in items:
            tag = item.as_type(str, what="a tag or a list of tags")
            if tag is None:
                return None
            if not _TAG_RE.match(tag):
                item.error(f"invalid tag '{tag}', expected letters, digits, '-', '_', '.', ':' or '/'")
                return None
            tags.append(tag)
        if not tags:
            node.error("empty tag list, expected at least one tag")
            return None
        return tuple(tags)


def build_registry(extra_actions: Sequence[ActionSpec] = ()) -> Registry:
    """A fresh registry with the built-in actions plus ``extra_actions``."""
    registry = Registry()
    builtins: tuple[ActionSpec, ...] = (AllowAction(), DenyAction(), TagAction())
    for spec in (*builtins, *extra_actions):
        registry.add_action(spec)
    return registry


def default_registry(extra_actions: Sequence[ActionSpec] = ()) -> Registry:
    """Built-ins, ``extra_actions`` and every installed extension of :data:`EXTENSION_MODULES`."""
    found: list[ActionSpec] = list(extra_actions)
    names = {a.name for a in found}
    for module_name, attribute in EXTENSION_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only "that module is not there yet" is tolerated; a broken import inside it is not.
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue
            raise
        spec: ActionSpec | None = getattr(module, attribute, None)
        if spec is not None and spec.name not in names:
            found.append(spec)
            names.add(spec.name)
    return build_registry(found)
