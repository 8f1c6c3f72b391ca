"""YAML with source positions, and a small typed reader that reports every problem at once.

Config and policy loaders both read YAML through :class:`Node` so that every error can name
``file:line:col`` and the key path, and so that all errors are collected and reported together
instead of stopping at the first.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# libyaml's parser (PyYAML's C binding, present in its wheels) composes the same nodes with the
# same marks ~5x faster than the pure-Python one: a keys file of 20,000 keys took 15 s to compose,
# long enough to starve the event loop of the GIL during a reload. Pure Python where it is absent.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class Mark:
    """A 1-based position in a source file."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found in a config or policy file."""

    mark: Mark | None
    path: str
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = str(self.mark) if self.mark else "<unknown>"
        prefix = "warning: " if self.severity == "warning" else ""
        path = f"{self.path}: " if self.path else ""
        return f"{where}: {prefix}{path}{self.message}"


class ConfigError(Exception):
    """Raised with every error found; ``str()`` lists them one per line."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


@dataclass(slots=True)
class Issues:
    """Collector passed through loaders; ``raise_if_errors`` ends a load."""

    items: list[Issue] = field(default_factory=list)

    def error(self, mark: Mark | None, path: str, message: str) -> None:
        self.items.append(Issue(mark, path, message))

    def warning(self, mark: Mark | None, path: str, message: str) -> None:
        self.items.append(Issue(mark, path, message, "warning"))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.items if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.items if i.severity == "warning"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise ConfigError(sorted(self.errors, key=_issue_order))


def _issue_order(issue: Issue) -> tuple[str, int, int]:
    if issue.mark is None:
        return ("", 0, 0)
    return (issue.mark.file, issue.mark.line, issue.mark.col)


def _mark(filename: str, node: yaml.Node) -> Mark:
    return Mark(filename, node.start_mark.line + 1, node.start_mark.column + 1)


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a mapping",
}


class Node:
    """A YAML value with its position; mappings keep their key positions too."""

    __slots__ = ("value", "mark", "path", "key_marks", "issues", "_children")

    def __init__(
        self, value: Any, mark: Mark, path: str, issues: Issues,
        key_marks: dict[str, Mark] | None = None, children: Any = None,
    ) -> None:
        self.value = value
        self.mark = mark
        self.path = path
        self.issues = issues
        self.key_marks = key_marks or {}
        self._children = children

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, filename: str, issues: Issues) -> Node | None:
        """Parse one YAML document; syntax errors are reported into ``issues``."""
        try:
            try:
                root = yaml.compose(text, Loader=_LOADER)
            except yaml.YAMLError:
                # the pure-Python parser words its errors better ("expected ',' or '}', but got
                # '<stream end>'" where libyaml says "did not find expected ',' or '}'"): let it report
                root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            m = exc.problem_mark
            mark = Mark(filename, m.line + 1, m.column + 1) if m else Mark(filename, 1, 1)
            issues.error(mark, "", f"invalid YAML: {exc.problem or exc}")
            return None
        except yaml.YAMLError as exc:
            issues.error(Mark(filename, 1, 1), "", f"invalid YAML: {exc}")
            return None
        if root is None:
            return cls({}, Mark(filename, 1, 1), "", issues, children={})
        # One constructor per document, for its scalars (a loader per scalar cost more than the parse).
        return cls._build(root, filename, "", issues, yaml.constructor.SafeConstructor())

    @classmethod
    def _build(cls, node: yaml.Node, filename: str, path: str, issues: Issues,
               scalars: yaml.constructor.SafeConstructor) -> Node:
        mark = _mark(filename, node)
        if isinstance(node, yaml.MappingNode):
            children: dict[str, Node] = {}
            key_marks: dict[str, Mark] = {}
            for key_node, value_node in node.value:
                key = str(scalars.construct_object(key_node))
                child_path = f"{path}.{key}" if path else key
                if key in children:
                    issues.error(_mark(filename, key_node), child_path, "duplicate key")
                key_marks[key] = _mark(filename, key_node)
                children[key] = cls._build(value_node, filename, child_path, issues, scalars)
            plain = {k: v.value for k, v in children.items()}
            return cls(plain, mark, path, issues, key_marks, children)
        if isinstance(node, yaml.SequenceNode):
            items = [cls._build(item, filename, f"{path}[{i}]", issues, scalars)
                     for i, item in enumerate(node.value)]
            return cls([i.value for i in items], mark, path, issues, children=items)
        try:
            value = scalars.construct_object(node)
        except yaml.YAMLError as exc:
            issues.error(mark, path, f"cannot read value: {exc}")
            value = None
        return cls(value, mark, path, issues)

    # ---- inspection ---------------------------------------------------------------------
    @property
    def is_mapping(self) -> bool:
        return isinstance(self._children, dict)

    @property
    def is_list(self) -> bool:
        return isinstance(self._children, list)

    def error(self, message: str, key: str | None = None) -> None:
        """Report an error at this node (or at one of its keys)."""
        mark = self.key_marks.get(key, self.mark) if key else self.mark
        path = f"{self.path}.{key}" if key and self.path else (key or self.path)
        self.issues.error(mark, path, message)

    def warning(self, message: str) -> None:
        self.issues.warning(self.mark, self.path, message)

    def has(self, key: str) -> bool:
        return self.is_mapping and key in self._children

    def child(self, key: str) -> Node | None:
        if not self.is_mapping:
            return None
        node: Node | None = self._children.get(key)
        return node

    def items(self) -> Iterator[tuple[str, Node]]:
        if self.is_mapping:
            yield from self._children.items()

    def elements(self) -> Iterator[Node]:
        if self.is_list:
            yield from self._children

    def keys(self) -> list[str]:
        return list(self._children) if self.is_mapping else []

    # ---- validation helpers -------------------------------------------------------------
    def expect_mapping(self, what: str = "a mapping") -> bool:
        if not self.is_mapping:
            self.issues.error(self.mark, self.path, f"expected {what}, got {_describe(self.value)}")
            return False
        return True

    def expect_list(self, what: str = "a list") -> bool:
        if not self.is_list:
            self.issues.error(self.mark, self.path, f"expected {what}, got {_describe(self.value)}")
            return False
        return True

    def check_keys(self, allowed: set[str] | list[str] | frozenset[str],
                   required: set[str] | list[str] | tuple[str, ...] = ()) -> None:
        """Report unknown keys (with the closest valid one) and missing required keys."""
        if not self.is_mapping:
            return
        allowed_list = sorted(allowed)
        for key in self._children:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed_list, n=1, cutoff=0.6)
                hint = (f"; did you mean '{close[0]}'?" if close
                        else f"; expected one of: {', '.join(allowed_list)}")
                self.error(f"unknown key '{key}'{hint}", key)
        for key in sorted(required):
            if key not in self._children:
                self.issues.error(self.mark, self.path or "<root>", f"missing required key '{key}'")

    def get(
        self, key: str, kind: type[T] | tuple[type, ...], default: T | None = None,
        required: bool = False, what: str | None = None,
    ) -> T | None:
        """Read a scalar child of an expected type; report and return ``default`` if wrong."""
        node = self.child(key)
        if node is None:
            if required:
                self.issues.error(self.mark, self.path or "<root>", f"missing required key '{key}'")
            return default
        if node.value is None and not required:
            return default  # an explicit null means "not set"
        return node.as_type(kind, default, what)

    def as_type(self, kind: type[T] | tuple[type, ...], default: T | None = None,
                what: str | None = None) -> T | None:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        value = self.value
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return value  # type: ignore[return-value]
        if not ok:
            expected = what or " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.issues.error(self.mark, self.path, f"expected {expected}, got {_describe(value)}")
            return default
        return value  # type: ignore[no-any-return]

    def map_children(self, fn: Callable[[str, Node], T | None]) -> dict[str, T]:
        out: dict[str, T] = {}
        for key, child in self.items():
            result = fn(key, child)
            if result is not None:
                out[key] = result
        return out


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string '{shown}'"
    return f"{type(value).__name__} {value!r}"


def parse_duration(text: Any) -> float | None:
    """Parse ``250ms``, ``30s``, ``5m``, ``2h``, ``1d``, ``1w``, ``1mo`` or a number of seconds."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return float(text) if text >= 0 else None
    if not isinstance(text, str):
        return None
    s = text.strip().lower()
    units = (("ms", 0.001), ("mo", 30 * 86400.0), ("s", 1.0), ("m", 60.0), ("h", 3600.0),
             ("d", 86400.0), ("w", 7 * 86400.0))
    for suffix, scale in units:
        if s.endswith(suffix):
            number = s[: -len(suffix)].strip()
            try:
                value = float(number)
            except ValueError:
                return None
            return value * scale if value >= 0 else None
    try:
        value = float(s)
    except ValueError:
        return None
    return value if value >= 0 else None


DURATION_HELP = "a duration such as 250ms, 30s, 5m, 1h, 1d, 1w or 1mo"


def read_duration(node: Node, key: str, default: float, low: float = 0.0,
                  high: float = float("inf")) -> float:
    """The duration under ``key`` in seconds (``default`` when absent); errors go to the node."""
    child = node.child(key)
    if child is None or child.value is None:
        return default
    value = parse_duration(child.value)
    if value is None:
        child.error(f"expected {DURATION_HELP}, got {child.value!r}")
        return default
    if not low <= value <= high:
        child.error(f"must be between {low:g}s and {high:g}s, got {value:g}s")
        return default
    return value
