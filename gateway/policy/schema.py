"""Policy files → frozen definitions, with every structural error reported at its position.

This layer checks the shape of each file (keys, types, ids, list values). Conditions and
actions stay as :class:`~gateway.yamlsource.Node` so the compiler can report their errors at
the exact spot; the compiler also owns cross-file checks that need every file at once.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from gateway.policy.fields import asn_problem, country_problem
from gateway.yamlsource import Issues, Mark, Node

POLICY_VERSION = 1
MODES = ("enforce", "shadow")
DECISIONS = ("allow", "deny")
LIST_KINDS = ("accounts", "asns", "cidrs", "countries", "models", "strings")
RULE_KEYS = frozenset({"id", "description", "when", "mode"})
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_ID_HELP = "an id of letters, digits, '-', '_', '.' or ':'"


@dataclass(frozen=True, slots=True)
class NamedList:
    """A named list of typed values (``countries``: str, ``asns``: int, ``cidrs``: networks)."""

    name: str
    kind: str
    values: tuple[Any, ...]
    mark: Mark


@dataclass(frozen=True, slots=True)
class RuleDef:
    """One rule as written; ``when`` and the action values are compiled later."""

    id: str
    description: str
    mode: str | None
    when: Node | None
    actions: tuple[tuple[str, Node], ...]
    mark: Mark
    file: str
    path: str  # key path of the rule in its file, e.g. rules[3]


@dataclass(frozen=True, slots=True)
class SettingsDef:
    """The policy set's global settings (one file at most defines them)."""

    default: str
    mode: str
    deny: Node | None
    mark: Mark


@dataclass(frozen=True, slots=True)
class PolicyFile:
    """One parsed file; any part may be empty."""

    name: str
    rules: tuple[RuleDef, ...]
    lists: tuple[NamedList, ...]
    settings: SettingsDef | None
    tests: Node | None


def parse_file(name: str, text: str, action_names: frozenset[str], issues: Issues) -> PolicyFile | None:
    """Parse one policy/test file; problems go to ``issues``."""
    root = Node.parse(text, name, issues)
    if root is None:
        return None
    if not root.expect_mapping("a mapping with 'version' and 'rules', 'lists', 'settings' or 'tests'"):
        return None
    root.check_keys({"version", "settings", "lists", "rules", "tests"}, required=("version",))
    version = root.get("version", int)
    if version is not None and version != POLICY_VERSION:
        node = root.child("version")
        assert node is not None
        node.error(f"unsupported version {version}, expected {POLICY_VERSION}")
    settings = _parse_settings(root.child("settings"))
    lists = _parse_lists(root.child("lists"))
    rules: list[RuleDef] = []
    rules_node = root.child("rules")
    if rules_node is not None and rules_node.expect_list("a list of rules"):
        for element in rules_node.elements():
            rule = _parse_rule(element, name, action_names)
            if rule is not None:
                rules.append(rule)
    tests = root.child("tests")
    if tests is not None and not tests.expect_list("a list of test cases"):
        tests = None
    return PolicyFile(name, tuple(rules), tuple(lists), settings, tests)


def _choice(node: Node, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
    child = node.child(key)
    if child is None:
        return default
    value = child.as_type(str, what=" or ".join(f"'{c}'" for c in choices))
    if value is None:
        return default
    if value not in choices:
        child.error(f"unknown {key} '{value}', expected " + " or ".join(f"'{c}'" for c in choices))
        return default
    return value


def _parse_settings(node: Node | None) -> SettingsDef | None:
    if node is None or not node.expect_mapping():
        return None
    node.check_keys({"default", "mode", "deny"})
    default = _choice(node, "default", DECISIONS, "allow") or "allow"
    mode = _choice(node, "mode", MODES, "enforce") or "enforce"
    return SettingsDef(default, mode, node.child("deny"), node.mark)


def _parse_rule(node: Node, file: str, action_names: frozenset[str]) -> RuleDef | None:
    if not node.expect_mapping("a rule (a mapping with 'id', 'when' and actions)"):
        return None
    node.check_keys(RULE_KEYS | action_names, required=("id",))
    rule_id = node.get("id", str)
    if rule_id is not None and not _ID_RE.match(rule_id):
        child = node.child("id")
        assert child is not None
        child.error(f"invalid rule id '{rule_id}', expected {_ID_HELP}")
        rule_id = None
    description = node.get("description", str, "") or ""
    mode = _choice(node, "mode", MODES, None)
    actions = tuple((k, v) for k, v in node.items() if k in action_names)
    # An unknown key is most likely a misspelt or unregistered action: its error says enough.
    if not actions and all(k in RULE_KEYS for k in node.keys()):
        names = ", ".join(sorted(action_names))
        node.error(f"rule has no action, expected at least one of: {names}")
    if rule_id is None:
        return None
    return RuleDef(rule_id, description, mode, node.child("when"), actions, node.mark, file, node.path)


def _parse_lists(node: Node | None) -> list[NamedList]:
    out: list[NamedList] = []
    if node is None or not node.expect_mapping("a mapping of list kinds (countries, cidrs, ...)"):
        return out
    node.check_keys(set(LIST_KINDS))
    for kind, group in node.items():
        if kind not in LIST_KINDS or not group.expect_mapping("a mapping of list names to values"):
            continue
        for name, values in group.items():
            if not _ID_RE.match(name):
                group.error(f"invalid list name '{name}', expected {_ID_HELP}", name)
                continue
            if not values.expect_list(f"a list of {kind}"):
                continue
            parsed = [_list_value(kind, v) for v in values.elements()]
            out.append(NamedList(name, kind, tuple(p for p in parsed if p is not None),
                                 group.key_marks.get(name, values.mark)))
    return out


def _list_value(kind: str, node: Node) -> Any:
    """Validate one value of a named list of ``kind``; None after reporting a problem."""
    if kind == "asns":
        asn = node.as_type(int, what="an AS number (integer)")
        problem = asn_problem(asn) if asn is not None else None
        if problem:
            node.error(problem)
            return None
        return asn
    value = node.as_type(str)
    if value is None:
        return None
    if kind == "countries":
        problem = country_problem(value)
        if problem:
            node.error(problem)
            return None
    elif kind == "cidrs":
        return parse_cidr(value, node)
    return value


def parse_cidr(text: str, node: Node) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """Parse a CIDR; host bits must be zero so a typo like 10.0.0.1/8 is caught, not widened."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        node.error(f"bad CIDR '{text}': {exc}, expected a network such as 10.0.0.0/8 or 2001:db8::/32")
        return None
