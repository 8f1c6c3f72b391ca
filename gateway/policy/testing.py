"""Policy test cases: a request context in, the expected decision, rules and actions out.

Test cases live beside the policies (a ``tests:`` list in any policy file, by convention in
``*.test.yaml``). The same request format feeds ``gateway policy explain --request``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import ApiFamily, ClientInfo, Principal, RequestContext, RequestView, RiskInfo
from gateway.ipaddr import Nat64Prefixes, parse_ip
from gateway.policy.fields import asn_problem, country_problem
from gateway.policy.textfile import read_utf8
from gateway.yamlsource import ConfigError, Issues, Mark, Node

if TYPE_CHECKING:
    from gateway.policy.evaluate import Outcome, Snapshot

_REQUEST = {"api": str, "route": str, "path": str, "method": str, "model": str, "stream": bool,
            "max_tokens": int, "n": int, "logprobs": bool, "top_logprobs": int, "logit_bias": bool,
            "reasoning": bool, "reasoning_budget": int, "input_tokens_estimate": int, "body_bytes": int}
_PRINCIPAL = {"authenticated": bool, "source": str, "key_id": str, "account": str, "org": str,
              "tier": str, "created_at": float}
_CLIENT = {"ip": str, "peer_ip": str, "country": str, "registered_country": str, "asn": int,
           "as_org": str, "is_anonymous": bool, "is_anonymous_vpn": bool, "is_hosting_provider": bool,
           "is_tor_exit_node": bool, "is_public_proxy": bool, "is_residential_proxy": bool}
_RISK = {"score": float, "cluster_id": str, "cluster_score": float, "cluster_size": int, "template_id": str}
_MAPS = {"request": ("headers",), "principal": ("claims", "attributes"), "client": (), "risk": ("signals",)}
REQUEST_KEYS = ("request", "principal", "client", "risk", "time", "tags")
# When a test case sets no ``time``: a fixed instant (a Wednesday, noon UTC), not the clock, so a
# policy's tests give the same answer whenever they run (a rule on time.hour or time.weekday
# would otherwise match in CI at one hour of the week only).
TEST_DEFAULT_TIME = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC).timestamp()
_EXPECT_KEYS = ("decision", "rule", "status", "matched", "actions", "tags", "shadow", "would_decide")


@dataclass(frozen=True, slots=True)
class TestCase:
    """One test: ``make_context`` builds a fresh context per run (evaluation adds tags to it)."""

    __test__ = False  # not a pytest class

    name: str
    mark: Mark
    make_context: Callable[[], RequestContext]
    expect: Mapping[str, Any]


@dataclass(slots=True)
class TestResult:
    __test__ = False

    case: TestCase
    failures: list[str]
    outcome: Outcome

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(slots=True)
class TestReport:
    __test__ = False

    results: list[TestResult] = field(default_factory=list)
    covered: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[TestResult]:
        return [r for r in self.results if not r.passed]

    @property
    def coverage(self) -> float:
        total = len(self.covered) + len(self.uncovered)
        return 100.0 if total == 0 else 100.0 * len(self.covered) / total


def _section(node: Node | None, kinds: Mapping[str, type], maps: tuple[str, ...]) -> dict[str, Any]:
    if node is None or not node.expect_mapping():
        return {}
    node.check_keys({*kinds, *maps})
    out: dict[str, Any] = {}
    for key, child in node.items():
        if key in maps:
            if child.expect_mapping():
                out[key] = dict(child.value)
        elif key in kinds and child.value is None:
            out[key] = None  # explicit null: the field is unknown, as in a real request
        elif key in kinds:
            value = child.as_type(kinds[key])
            if value is not None:
                out[key] = value
    return out


def _time(node: Node | None) -> float | None:
    if node is None:
        return None
    value = node.value
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
        except ValueError:
            pass
    node.error("expected an ISO 8601 time such as 2025-01-31T14:00:00Z or a Unix timestamp")
    return None


def _ip(node: Node | None, key: str, value: str | None, nat64: Nat64Prefixes | None) -> Any:
    if value is None:
        return None
    # Normalised exactly as the client_ip stage does for live traffic (IPv4-mapped, NAT64 with the
    # configured local prefixes, 6to4, Teredo, zone ids), so a test case or explain decides as the
    # gateway would.
    address = parse_ip(value, nat64)
    if address is None and node is not None:
        (node.child(key) or node).error(f"'{value}' is not an IP address, expected e.g. 192.0.2.1")
    return address


def context_factory(node: Node, default_time: float | None = None,
                    nat64: Nat64Prefixes | None = None) -> Callable[[], RequestContext] | None:
    """Validate a request mapping (request/principal/client/risk/time/tags); None on errors.
    Without ``time`` the request starts at ``default_time``, or now when that is None. ``nat64``:
    the gateway's local NAT64 prefixes (``client_ip.nat64_prefixes``), for client addresses."""
    before = len(node.issues.errors)
    if not node.expect_mapping():
        return None
    node.check_keys(set(REQUEST_KEYS) | {"name", "expect"})
    req = _section(node.child("request"), _REQUEST, _MAPS["request"])
    pri = _section(node.child("principal"), _PRINCIPAL, _MAPS["principal"])
    cli = _section(node.child("client"), _CLIENT, ())
    risk = _section(node.child("risk"), _RISK, _MAPS["risk"])
    when = _time(node.child("time"))
    if when is None:
        when = default_time
    tags_node = node.child("tags")
    tags = [str(t) for t in tags_node.value] if tags_node is not None and tags_node.expect_list() else []
    client_node = node.child("client")
    for key in ("country", "registered_country"):
        problem = country_problem(cli[key]) if isinstance(cli.get(key), str) else None
        if problem and client_node is not None:
            (client_node.child(key) or client_node).error(problem)
    asn_issue = asn_problem(cli["asn"]) if isinstance(cli.get("asn"), int) else None
    if asn_issue and client_node is not None:
        (client_node.child("asn") or client_node).error(asn_issue)
    api = req.get("api", "openai")
    if api not in tuple(ApiFamily):
        (node.child("request") or node).error(f"unknown api '{api}', expected 'openai' or 'anthropic'")
    cli["ip"] = _ip(client_node, "ip", cli.get("ip"), nat64)
    cli["peer_ip"] = _ip(client_node, "peer_ip", cli.get("peer_ip"), nat64) or cli["ip"]
    if len(node.issues.errors) > before:
        return None
    pri.setdefault("authenticated", bool(pri.get("account") or pri.get("key_id")))
    headers = {str(k).lower(): str(v) for k, v in req.pop("headers", {}).items()}
    req.setdefault("route", "chat.completions")
    req.setdefault("path", "/v1/chat/completions" if api == "openai" else "/v1/messages")
    req.setdefault("method", "POST")
    req["api"] = ApiFamily(api)

    def make() -> RequestContext:
        view = RequestView(headers=CIMultiDictProxy(CIMultiDict(headers)), **req)
        ctx = RequestContext(request_id="policy-test", request=view, principal=Principal(**pri),
                             client=ClientInfo(**cli), risk=RiskInfo(**risk), tags=set(tags))
        if when is not None:
            ctx.wall_time = when
        return ctx

    return make


def context_from_mapping(data: Mapping[str, Any], filename: str = "<request>",
                         nat64: Nat64Prefixes | None = None) -> RequestContext:
    """Build a RequestContext from a test-case style mapping; raise ConfigError if invalid."""
    issues = Issues()
    node = Node.parse(yaml.safe_dump(dict(data), sort_keys=False), filename, issues)
    make = context_factory(node, nat64=nat64) if node is not None else None
    issues.raise_if_errors()
    assert make is not None
    return make()


def load_request_file(path: str, nat64: Nat64Prefixes | None = None) -> RequestContext:
    """A request file for ``explain``: the request part of a test case; ConfigError if invalid or
    unreadable (including a file that is not UTF-8 text)."""
    text = read_utf8(Path(path), path)
    issues = Issues()
    node = Node.parse(text, path, issues)
    make = context_factory(node, nat64=nat64) if node is not None else None
    issues.raise_if_errors()
    if make is None:
        raise ConfigError(issues.errors)
    return make()


def parse_tests(node: Node, rule_ids: set[str], action_names: frozenset[str],
                nat64: Nat64Prefixes | None = None) -> list[TestCase]:
    """Validate a ``tests:`` list; expectations may only name rules that exist."""
    cases: list[TestCase] = []
    for item in node.elements():
        if not item.expect_mapping("a test case (name, request..., expect)"):
            continue
        name = item.get("name", str, required=True)
        make = context_factory(item, TEST_DEFAULT_TIME, nat64)
        expect = item.child("expect")
        if expect is None:
            item.error("missing required key 'expect'")
            continue
        if not expect.expect_mapping():
            continue
        expect.check_keys(set(_EXPECT_KEYS))
        for key in ("decision", "would_decide"):
            value = expect.get(key, str)
            if value is not None and value not in ("allow", "deny"):
                (expect.child(key) or expect).error(f"unknown decision '{value}', expected 'allow' or 'deny'")
        for key, child in expect.items():
            for ref in _rule_refs(key, child):
                if ref.value not in rule_ids:
                    ref.error(f"unknown rule id '{ref.value}' in expectation")
            if key == "actions":
                for entry in child.elements():
                    action = entry.value.get("action") if isinstance(entry.value, dict) else entry.value
                    if action not in action_names:
                        known = ", ".join(sorted(action_names))
                        entry.error(f"unknown action '{action}', expected one of: {known}")
        if name is not None and make is not None:
            cases.append(TestCase(name, item.mark, make, dict(expect.value)))
    return cases


def _rule_refs(key: str, node: Node) -> list[Node]:
    if key == "rule":
        return [node] if node.value is not None else []
    if key in ("matched", "shadow") and node.expect_list(f"a list of rule ids under '{key}'"):
        return list(node.elements())
    if key == "actions" and node.expect_list("a list of action names or {rule, action} mappings"):
        return [r for e in node.elements() if (r := e.child("rule")) is not None]
    return []


def check_case(case: TestCase, outcome: Outcome) -> list[str]:
    """Differences between ``outcome`` and the case's expectations, as readable lines."""
    want = case.expect
    got: dict[str, Any] = {
        "decision": outcome.decision, "rule": outcome.rule_id,
        "status": outcome.deny.status if outcome.deny else None,
        "matched": outcome.matched, "tags": sorted(outcome.tags),
        "shadow": [h.rule_id for h in outcome.shadow], "would_decide": outcome.would_decide,
    }
    failures = []
    for key, expected in want.items():
        if key == "actions":
            actual = [(a.rule_id, a.name) for a in outcome.actions]
            shaped = [(e.get("rule"), e.get("action")) if isinstance(e, dict) else (None, e)
                      for e in expected]
            ok = len(actual) == len(shaped) and all(
                name == a_name and rule in (None, a_rule)
                for (rule, name), (a_rule, a_name) in zip(shaped, actual, strict=True)
            )
            if not ok:
                failures.append(f"actions: expected {expected}, got {[f'{r}:{n}' for r, n in actual]}")
            continue
        value = sorted(expected) if key == "tags" else expected
        if got[key] != value:
            failures.append(f"{key}: expected {value!r}, got {got[key]!r}")
    return failures


def run_tests(snapshot: Snapshot) -> TestReport:
    """Run every test case of ``snapshot``; coverage counts rules matched by at least one case."""
    from gateway.policy.evaluate import evaluate

    report = TestReport()
    hit: set[str] = set()
    for case in snapshot.tests:
        outcome = evaluate(snapshot, case.make_context())
        hit.update(outcome.matched)
        hit.update(h.rule_id for h in outcome.shadow)
        report.results.append(TestResult(case, check_case(case, outcome), outcome))
    report.covered = [r.id for r in snapshot.rules if r.id in hit]
    report.uncovered = [r.id for r in snapshot.rules if r.id not in hit]
    return report


def format_report(report: TestReport) -> str:
    lines = []
    for result in report.results:
        status = "ok  " if result.passed else "FAIL"
        lines.append(f"{status} {result.case.mark}: {result.case.name}")
        lines.extend(f"       {f}" for f in result.failures)
    total, failed = len(report.results), len(report.failed)
    lines.append(f"{total - failed} passed, {failed} failed")
    lines.append(f"rule coverage: {report.coverage:.1f}% ({len(report.covered)}/"
                 f"{len(report.covered) + len(report.uncovered)} rules)")
    if report.uncovered:
        lines.append("rules never exercised: " + ", ".join(report.uncovered))
    return "\n".join(lines)
