"""Operators and the condition tree (``field`` + operator, ``all``, ``any``, ``not``).

Each leaf compiles to a predicate on the field's value; the tree compiles to one closure per
rule for evaluation, and keeps its structure so ``explain`` can name the condition that failed.
Operators from other features plug in through :attr:`Registry.operators`.
"""

from __future__ import annotations

import bisect
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.ipaddr import Nat64Prefixes, matched_networks, parse_ip, unmatchable_reason
from gateway.policy.fields import FieldSpec, Kind, asn_problem, country_problem, resolve_field
from gateway.policy.registry import CompileEnv, Registry
from gateway.policy.schema import NamedList, parse_cidr
from gateway.stages.client_ip import nat64_of
from gateway.yamlsource import Node

Test = Callable[[Any], bool]
Predicate = Callable[[Any], bool]  # on a RequestContext; Any keeps closures cheap to type
_COLLECTIONS = (set, frozenset, list, tuple)
# Which named-list kinds an in/not_in may use on a field of each kind.
_LIST_FOR_KIND: Mapping[Kind, tuple[str, ...]] = {
    Kind.STR: ("accounts", "models", "strings", "countries"),
    Kind.ANY: ("accounts", "models", "strings", "countries", "asns"),
    Kind.TAGS: ("strings",),
    Kind.COUNTRY: ("countries",),
    Kind.INT: ("asns",),
    Kind.NUM: (),
    Kind.BOOL: (),
    Kind.IP: (),
}
BUILTIN_OPERATORS = ("equals", "in", "not_in", "cidr", "regex", "gt", "gte", "lt", "lte", "exists")


@dataclass(frozen=True, slots=True)
class Matcher:
    """A compiled operator; ``index_values`` is set when only those values can match."""

    test: Test
    text: str
    index_values: frozenset[Any] | None = None


@dataclass(frozen=True, slots=True)
class Leaf:
    field: FieldSpec
    matcher: Matcher


@dataclass(frozen=True, slots=True)
class AllOf:
    items: tuple[Cond, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    items: tuple[Cond, ...]


@dataclass(frozen=True, slots=True)
class NotOf:
    item: Cond


Cond = Leaf | AllOf | AnyOf | NotOf
ALWAYS = AllOf(())


def build_predicate(cond: Cond) -> Predicate:
    """One closure per condition tree; small fixed arities avoid a loop per call."""
    if isinstance(cond, Leaf):
        get, test = cond.field.getter, cond.matcher.test
        return lambda c: test(get(c))
    if isinstance(cond, NotOf):
        inner = build_predicate(cond.item)
        return lambda c: not inner(c)
    preds = tuple(build_predicate(i) for i in cond.items)
    if isinstance(cond, AllOf):
        if not preds:
            return lambda c: True
        if len(preds) == 1:
            return preds[0]
        if len(preds) == 2:
            a, b = preds
            return lambda c: a(c) and b(c)
        return lambda c: all(p(c) for p in preds)
    if len(preds) == 1:
        return preds[0]
    return lambda c: any(p(c) for p in preds)


def show(value: Any) -> str:
    return "null" if value is None else repr(value)


class ConditionCompiler:
    """Compiles ``when`` trees against the policy set's named lists and the registry."""

    def __init__(self, lists: Mapping[str, NamedList], registry: Registry, env: CompileEnv) -> None:
        self._lists = lists
        self._registry = registry
        self._env = env
        # Local NAT64 prefixes from the gateway's client_ip settings: CIDRs, IP literals and IP
        # strings are read as the client_ip stage reads the live address, so they agree.
        self._nat64 = nat64_of(env.settings)
        self.used_lists: set[str] = set()

    @property
    def operators(self) -> list[str]:
        return sorted({*BUILTIN_OPERATORS, *self._registry.operators})

    def compile(self, node: Node) -> Cond | None:
        if not node.expect_mapping("a condition (field + operator, or all/any/not)"):
            return None
        keys = node.keys()
        for combinator in ("all", "any", "not"):
            if combinator in keys:
                return self._combinator(node, combinator)
        node.check_keys({"field", "all", "any", "not", *self.operators}, required=("field",))
        path = node.get("field", str)
        ops = [k for k in keys if k in self.operators]
        if path is None:
            return None
        field = resolve_field(path)
        if isinstance(field, str):
            child = node.child("field")
            assert child is not None
            child.error(field)
            return None
        if not ops:
            if keys == ["field"]:  # otherwise the unknown key reported above says it better
                node.error(f"condition on '{path}' has no operator, expected one of: "
                           f"{', '.join(self.operators)}")
            return None
        if len(ops) > 1:
            node.error(f"condition has several operators ({', '.join(ops)}), expected one; "
                       "combine conditions with 'all'")
            return None
        operand = node.child(ops[0])
        assert operand is not None
        matcher = self._operator(ops[0], operand, field)
        return Leaf(field, matcher) if matcher is not None else None

    def _combinator(self, node: Node, name: str) -> Cond | None:
        node.check_keys({name})
        if len(node.keys()) > 1:
            return None
        child = node.child(name)
        assert child is not None
        if name == "not":
            inner = self.compile(child)
            return NotOf(inner) if inner is not None else None
        if not child.expect_list(f"a list of conditions under '{name}'"):
            return None
        items = [self.compile(c) for c in child.elements()]
        if name == "any" and not items:
            child.error("empty 'any' never matches, expected at least one condition")
            return None
        if any(i is None for i in items):
            return None
        done = tuple(i for i in items if i is not None)
        return AllOf(done) if name == "all" else AnyOf(done)

    def _operator(self, op: str, node: Node, field: FieldSpec) -> Matcher | None:
        if op not in BUILTIN_OPERATORS:
            test = self._registry.operators[op](node, self._env)
            return Matcher(test, f"{op} {show(node.value)}") if test is not None else None
        if op in ("gt", "gte", "lt", "lte"):
            return self._numeric(op, node, field)
        if op == "exists":
            flag = node.as_type(bool)
            if flag is None:
                return None
            present: Test = (lambda v: v is not None) if flag else (lambda v: v is None)
            return Matcher(present, f"exists {str(flag).lower()}")
        if op == "regex":
            return self._regex(node, field)
        if op == "cidr":
            return self._cidr(node, field)
        return self._membership(op, node, field)

    def _numeric(self, op: str, node: Node, field: FieldSpec) -> Matcher | None:
        if field.kind not in (Kind.INT, Kind.NUM, Kind.ANY):
            node.error(f"'{op}' compares numbers, but {field.path} holds {field.kind.value}")
            return None
        bound = node.as_type(float)
        if bound is None:
            return None
        b: float = bound
        compare: dict[str, Test] = {
            "gt": lambda v: v > b, "gte": lambda v: v >= b, "lt": lambda v: v < b, "lte": lambda v: v <= b,
        }
        inner = compare[op]
        return Matcher(lambda v: type(v) in (int, float) and inner(v), f"{op} {bound}")

    def _regex(self, node: Node, field: FieldSpec) -> Matcher | None:
        if field.kind in (Kind.INT, Kind.NUM, Kind.BOOL, Kind.IP):
            node.error(f"'regex' matches text, but {field.path} holds {field.kind.value}")
            return None
        pattern = node.as_type(str)
        if pattern is None:
            return None
        try:
            search = re.compile(pattern).search
        except re.error as exc:
            node.error(f"bad regular expression '{pattern}': {exc.msg} at position {exc.pos}, "
                       "expected a Python regular expression")
            return None

        def test(v: Any) -> bool:
            if isinstance(v, str):
                return search(v) is not None
            return isinstance(v, _COLLECTIONS) and any(isinstance(x, str) and search(x) for x in v)

        return Matcher(test, f"regex {pattern!r}")

    def _cidr(self, node: Node, field: FieldSpec) -> Matcher | None:
        if field.kind not in (Kind.IP, Kind.ANY):
            node.error(f"'cidr' matches IP addresses, but {field.path} holds {field.kind.value}")
            return None
        nets: list[Any] = []
        if isinstance(node.value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:-]*", node.value):
            named = self._named(node, ("cidrs",), field)
            if named is None:
                return None
            nets, text = list(named.values), f"cidr {named.name}"
        else:
            items = list(node.elements()) if node.is_list else [node]
            for item in items:
                raw = item.as_type(str, what="a CIDR, a list of CIDRs or a cidrs list name")
                net = parse_cidr(raw, item) if raw is not None else None
                if net is None:
                    return None
                nets.append(net)
            text = f"cidr {show(node.value)}"
        nat64 = self._nat64
        for net in nets:
            carrier = unmatchable_reason(net, nat64)
            if carrier is not None:
                node.warning(f"'{net}' lies in {carrier}, whose clients are matched as the IPv4 "
                             "address they carry, so this never matches; expected an IPv4 CIDR")
        matched = [m for net in nets for m in matched_networks(net, nat64)]
        return Matcher(_cidr_test(matched, nat64), text)

    def _named(self, node: Node, kinds: tuple[str, ...], field: FieldSpec) -> NamedList | None:
        name = str(node.value)
        named = self._lists.get(name)
        if named is None:
            close = [n for n in self._lists if n.lower() == name.lower()] or _close(name, list(self._lists))
            hint = f"; did you mean '{close[0]}'?" if close else "; define it under 'lists'"
            node.error(f"undefined list '{name}'{hint}")
            return None
        self.used_lists.add(name)
        if named.kind not in kinds:
            node.error(f"list '{name}' holds {named.kind}, which cannot be compared with {field.path} "
                       f"({field.kind.value})")
            return None
        return named

    def _membership(self, op: str, node: Node, field: FieldSpec) -> Matcher | None:
        if op == "equals":
            literal = self._literal(node, field)
            if literal is _BAD:
                return None
            values: frozenset[Any] = frozenset([literal])
            text = f"equals {show(node.value)}"
        elif isinstance(node.value, str):
            named = self._named(node, _LIST_FOR_KIND[field.kind], field)
            if named is None:
                return None
            values, text = frozenset(named.values), f"{op} {named.name}"
        elif node.expect_list(f"a list of values or the name of a list for '{op}'"):
            parsed = [self._literal(item, field) for item in node.elements()]
            if any(p is _BAD for p in parsed):
                return None
            values, text = frozenset(parsed), f"{op} {show(node.value)}"
        else:
            return None
        collection = field.kind in (Kind.ANY, Kind.TAGS)
        test = _member_test(values, collection)
        if op == "not_in":
            return Matcher(lambda v: not test(v), text)
        return Matcher(test, text, values if field.indexable else None)

    def _literal(self, node: Node, field: FieldSpec) -> Any:
        value = node.value
        kind = field.kind
        if kind == Kind.BOOL:
            return _or_bad(node.as_type(bool)) if value is not None else None
        if kind == Kind.INT and value is not None:
            number = node.as_type(int)
            problem = asn_problem(number) if number is not None and field.path == "client.asn" else None
            if problem:
                node.error(problem)
                return _BAD
            return _or_bad(number)
        if kind == Kind.NUM and value is not None:
            return _or_bad(node.as_type(float))
        if kind == Kind.IP and value is not None:
            # Normalised like the live client address, or ::ffff:192.0.2.5 would never match.
            address = parse_ip(str(value), self._nat64)
            if address is None:
                node.error(f"'{value}' is not an IP address, expected an address such as 192.0.2.1")
                return _BAD
            return address
        if kind in (Kind.STR, Kind.COUNTRY, Kind.TAGS) and value is not None:
            text = node.as_type(str)
            if text is None:
                return _BAD
            problem = country_problem(text) if kind == Kind.COUNTRY else None
            if problem:
                node.error(problem)
                return _BAD
            return text
        if isinstance(value, dict | list):
            node.error(f"expected a single value, got {'a mapping' if isinstance(value, dict) else 'a list'}")
            return _BAD
        return value


_BAD = object()


def _or_bad(value: Any) -> Any:
    return _BAD if value is None else value


def _close(name: str, options: list[str]) -> list[str]:
    return difflib.get_close_matches(name, options, n=1, cutoff=0.6)


def _member_test(values: frozenset[Any], collection: bool) -> Test:
    if not collection:
        return lambda v: v in values

    def test(v: Any) -> bool:
        if isinstance(v, _COLLECTIONS):
            return any(_hashable_in(x, values) for x in v)
        return _hashable_in(v, values)

    return test


def _hashable_in(v: Any, values: frozenset[Any]) -> bool:
    try:
        return v in values
    except TypeError:  # a claim may be a mapping; it is in no list
        return False


def _cidr_test(nets: list[Any], nat64: Nat64Prefixes | None = None) -> Test:
    """Merged integer ranges per IP version, searched by bisection: O(log n) per lookup.
    ``nets`` are as normalised addresses look (:func:`gateway.ipaddr.matched_networks`); string
    values are normalised as the client_ip stage does, with the same local NAT64 prefixes."""
    tables: dict[int, tuple[list[int], list[int]]] = {}
    for version in (4, 6):
        ranges = sorted((int(n.network_address), int(n.broadcast_address))
                        for n in nets if n.version == version)
        starts: list[int] = []
        ends: list[int] = []
        for lo, hi in ranges:
            if ends and lo <= ends[-1] + 1:
                ends[-1] = max(ends[-1], hi)
            else:
                starts.append(lo)
                ends.append(hi)
        tables[version] = (starts, ends)

    def test(v: Any) -> bool:
        if isinstance(v, str):  # a claim or header value: normalised like the client address
            v = parse_ip(v, nat64)
        if not isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        starts, ends = tables[v.version]
        n = int(v)
        i = bisect.bisect_right(starts, n) - 1
        return i >= 0 and n <= ends[i]

    return test
