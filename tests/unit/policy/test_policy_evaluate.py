"""Combination rule, shadow mode, extension actions, the index and explain."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.policy.builtin_actions import build_registry, default_registry
from gateway.policy.compile import Source, compile_sources
from gateway.policy.evaluate import Snapshot, evaluate
from gateway.policy.explain import explain
from gateway.policy.fields import ISO_COUNTRIES, resolve_field
from gateway.policy.registry import CompileEnv, Registry
from gateway.policy.testing import context_from_mapping, run_tests
from gateway.settings import parse_settings
from gateway.stages.match import MatchStage
from gateway.yamlsource import ConfigError, Node


def compile_text(text: str, registry: Registry | None = None) -> Snapshot:
    snapshot, issues = compile_sources([Source("p.yaml", text)], registry)
    assert snapshot is not None, [str(i) for i in issues]
    return snapshot


@dataclass(slots=True)
class FakeQuota:
    """Stands in for the quota feature's action: non-terminal, value is a limit descriptor."""

    name: str = "quota"
    terminal: bool = False

    def parse(self, node: Node, env: CompileEnv) -> Any | None:
        if not node.expect_mapping():
            return None
        node.check_keys({"rpm"}, required=("rpm",))
        return node.get("rpm", int)


@dataclass(slots=True)
class FakeChallenge:
    name: str = "challenge"
    terminal: bool = True

    def parse(self, node: Node, env: CompileEnv) -> Any | None:
        return node.value


COMBINED = """
version: 1
rules:
  - {id: q-all, quota: {rpm: 100}, tag: seen}
  - {id: q-free, when: {field: principal.tier, equals: free}, quota: {rpm: 10}}
  - {id: shadow-deny-cn, mode: shadow, when: {field: client.country, equals: CN}, deny: true, tag: s}
  - {id: deny-cn, when: {field: client.country, equals: CN}, deny: {status: 451}, tag: denied}
  - {id: allow-free, when: {field: principal.tier, equals: free}, allow: true}
  - {id: q-after, quota: {rpm: 1}}
"""


def test_combination_rule_accumulates_until_the_first_terminal_match() -> None:
    snapshot = compile_text(COMBINED, build_registry([FakeQuota()]))
    ctx = context_from_mapping({"principal": {"tier": "free"}, "client": {"country": "CN"}})
    out = evaluate(snapshot, ctx)
    assert (out.decision, out.rule_id, out.deny and out.deny.status) == ("deny", "deny-cn", 451)
    assert out.matched == ["q-all", "q-free", "deny-cn"]
    assert [(a.rule_id, a.name, a.value, a.shadow) for a in out.actions] == [
        ("q-all", "quota", 100, False),
        ("q-all", "tag", ("seen",), False),
        ("q-free", "quota", 10, False),
        ("shadow-deny-cn", "tag", ("s",), True),
        ("deny-cn", "tag", ("denied",), False),
    ]
    assert out.tags == ["seen", "denied"] and ctx.tags == {"seen", "denied"}  # shadow tag not applied
    assert [h.rule_id for h in out.shadow] == ["shadow-deny-cn"] and out.would_decide is None
    assert out.deny is not None and out.deny.rule_id == "deny-cn"
    assert out.deny.message == "This request is not permitted."  # neutral: no rule id, no country


def test_rules_after_the_terminal_match_are_not_evaluated() -> None:
    snapshot = compile_text(COMBINED, build_registry([FakeQuota()]))
    out = evaluate(
        snapshot, context_from_mapping({"principal": {"tier": "free"}, "client": {"country": "US"}})
    )
    assert out.decision == "allow" and out.rule_id == "allow-free"
    assert "q-after" not in [a.rule_id for a in out.actions]
    out = evaluate(
        snapshot, context_from_mapping({"principal": {"tier": "pro"}, "client": {"country": "US"}})
    )
    assert out.rule_id is None and [a.value for a in out.actions if a.name == "quota"] == [100, 1]


def test_terminal_extension_action_ends_evaluation_and_is_passed_on() -> None:
    text = "version: 1\nrules:\n  - {id: c, challenge: pow}\n  - {id: d, deny: true}\n"
    snapshot, issues = compile_sources([Source("p.yaml", text)], build_registry([FakeChallenge()]))
    assert snapshot is not None
    assert [str(i) for i in issues] == [
        "p.yaml:4:5: warning: rules[1]: rule 'd' is unreachable: rule 'c' at "
        "p.yaml:3:5 matches every request and ends evaluation"
    ]
    out = evaluate(snapshot, context_from_mapping({}))
    assert (out.decision, out.terminal, [a.value for a in out.actions]) == ("allow", "challenge", ["pow"])


def test_shadow_rule_records_would_decide() -> None:
    text = """version: 1
rules:
  - {id: s, mode: shadow, when: {field: client.country, equals: RU}, deny: true}
"""
    out = evaluate(compile_text(text), context_from_mapping({"client": {"country": "RU"}}))
    assert (out.decision, out.would_decide, out.would_rule_id) == ("allow", "deny", "s")


def test_unknown_action_without_extension_is_rejected_with_a_suggestion() -> None:
    _, issues = compile_sources(
        [Source("p.yaml", "version: 1\nrules:\n  - {id: a, quota: {rpm: 1}}\n")], build_registry()
    )
    assert [str(i) for i in issues] == [
        "p.yaml:3:13: rules[0].quota: unknown key 'quota'; "
        "expected one of: allow, deny, description, id, mode, tag, when"
    ]


def test_default_registry_has_builtins() -> None:
    assert {"allow", "deny", "tag"} <= set(default_registry().actions)
    with pytest.raises(ValueError):
        build_registry([FakeQuota(), FakeQuota()])


def test_fields_and_countries() -> None:
    assert len(ISO_COUNTRIES) == 250 and "XK" in ISO_COUNTRIES and "EU" not in ISO_COUNTRIES
    spec = resolve_field("client.country")
    assert not isinstance(spec, str) and spec.indexable
    assert (
        resolve_field("request.headers")
        == "'request.headers' needs a name after it, expected request.headers.<name>"
    )
    ctx = context_from_mapping(
        {"client": {"ip": "203.0.113.77"}, "principal": {"claims": {"org": {"country": "CN"}}}}
    )
    for path, value in [
        ("client.ip_prefix", "203.0.113.0/24"),
        ("principal.claims.org.country", "CN"),
        ("principal.claims.missing.x", None),
        ("risk.signals.burst", None),
    ]:
        field = resolve_field(path)
        assert not isinstance(field, str) and field.getter(ctx) == value


def test_context_from_mapping_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="unknown key 'countyr'; did you mean 'country'"):
        context_from_mapping({"client": {"countyr": "US"}})


def random_policy(rng: random.Random, n: int) -> str:
    countries = ["US", "CN", "DE", "FR"]
    lines = ["version: 1", "rules:"]
    for i in range(n):
        conds = [
            f"{{field: client.country, in: [{rng.choice(countries)}, {rng.choice(countries)}]}}",
            f"{{field: principal.tier, equals: {rng.choice(['free', 'pro'])}}}",
            f"{{field: request.model, not_in: [m{rng.randrange(3)}]}}",
            f"{{field: risk.score, gt: {rng.random():.2f}}}",
            f"{{field: principal.account, equals: a{rng.randrange(4)}}}",
            "{field: tags, equals: t1}",
        ]
        when = ", ".join(rng.sample(conds, rng.randrange(1, 4)))
        action = rng.choice(["deny: true", "allow: true", f"tag: t{i % 3}", "tag: x"])
        mode = ", mode: shadow" if rng.random() < 0.2 else ""
        lines.append(f"  - {{id: r{i}, when: {{all: [{when}]}}, {action}{mode}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("seed", range(5))
def test_indexed_evaluation_equals_linear_explain(seed: int) -> None:
    rng = random.Random(seed)
    snapshot = compile_text(random_policy(rng, 60))
    assert snapshot.index.fields, "the generated set must exercise the index"
    for _ in range(200):
        ctx = context_from_mapping(
            {
                "request": {"model": f"m{rng.randrange(4)}"},
                "principal": {"account": f"a{rng.randrange(5)}", "tier": rng.choice(["free", "pro", None])},
                "client": {"country": rng.choice(["US", "CN", "DE", "FR", None])},
                "risk": {"score": rng.random()},
            }
        )
        report = explain(snapshot, ctx)
        assert report["consistent"], report
        linear = [r["id"] for r in report["rules"] if r["result"] == "matched" and r["mode"] == "enforce"]
        assert linear == report["matched"]
        assert ctx.tags == set()  # explain works on a copy


async def test_match_stage_sets_outcome_and_revision() -> None:
    snapshot = compile_text(
        "version: 1\nrules:\n  - {id: d, when: {field: client.country, equals: CN}, deny: true}\n"
    )

    class Holder:
        current = snapshot

    stage = MatchStage(Holder())
    ctx = context_from_mapping({"client": {"country": "CN"}})
    decision = await stage(ctx)
    assert decision is not None and decision.status == 403 and decision.rule_id == "d"
    assert ctx.policy_revision == snapshot.revision and ctx.outcome.rule_id == "d"
    assert await stage(context_from_mapping({"client": {"country": "US"}})) is None


IP_RULES = """version: 1
rules:
  - {id: mapped-literal, when: {field: client.ip, equals: "::ffff:192.0.2.5"}, tag: a}
  - {id: nat64-in-list, when: {field: client.ip, in: ["64:ff9b::c633:6407"]}, tag: b}
  - {id: mapped-cidr, when: {field: client.ip, cidr: "::ffff:203.0.113.0/120"}, tag: c}
  - {id: nat64-cidr, when: {field: client.ip, cidr: "64:ff9b::6440:0/120"}, tag: d}
"""


@pytest.mark.parametrize(("client_ip", "matched"), [
    ("192.0.2.5", ["mapped-literal"]),
    ("198.51.100.7", ["nat64-in-list"]),
    ("203.0.113.200", ["mapped-cidr"]),
    ("100.64.0.99", ["nat64-cidr"]),
    ("2001:db8::1", []),
])
def test_ip_conditions_compare_as_the_client_ip_stage_normalises(client_ip: str, matched: list[str]) -> None:
    """Live client addresses arrive normalised (IPv4 inside IPv6 becomes IPv4); an operand written
    in an IPv6 form must still match them, or a region rule would silently never fire."""
    snapshot = compile_text(IP_RULES)
    assert evaluate(snapshot, context_from_mapping({"client": {"ip": client_ip}})).matched == matched


@pytest.mark.parametrize(("written", "normalised"), [
    ("::ffff:192.0.2.5", "192.0.2.5"),  # IPv4-mapped
    ("64:ff9b::c000:205", "192.0.2.5"),  # NAT64
    ("2002:c000:205::1", "192.0.2.5"),  # 6to4
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45"),  # Teredo (inverted)
    ("fe80::1%eth0", "fe80::1"),  # zone id dropped
])
def test_test_cases_and_explain_requests_normalise_client_ip(written: str, normalised: str) -> None:
    ctx = context_from_mapping({"client": {"ip": written}})
    assert str(ctx.client.ip) == normalised and ctx.client.peer_ip == ctx.client.ip
    rule = f'{{id: r, when: {{field: client.ip, equals: "{normalised}"}}, deny: true}}'
    snapshot = compile_text(f"version: 1\nrules:\n  - {rule}\n")
    assert evaluate(snapshot, ctx).decision == "deny"


def test_a_cidr_inside_6to4_or_teredo_space_is_warned_about() -> None:
    text = ('version: 1\nrules:\n  - {id: r, when: {field: client.ip, cidr: ["2002:c000:200::/40", '
            '"10.0.0.0/8"]}, deny: true}\n')
    snapshot, issues = compile_sources([Source("p.yaml", text)])
    assert snapshot is not None
    assert [str(i) for i in issues] == [
        "p.yaml:3:44: warning: rules[0].when.cidr: '2002:c000:200::/40' lies in 6to4 space, whose clients "
        "are matched as the IPv4 address they carry, so this never matches; expected an IPv4 CIDR"
    ]


LOCAL_NAT64_SETTINGS = "mock_upstream: {enabled: true}\nclient_ip:\n  nat64_prefixes: [64:ff9b:1::/48]\n"
# 203.0.113.7 under the RFC 8215 local-use prefix, laid out for a /48 (RFC 6052 §2.2).
NAT64_LOCAL_CLIENT = "64:ff9b:1:cb00:71:700::"
REGION_RULE = """version: 1
rules:
  - {id: blocked-net, when: {field: client.ip, cidr: 203.0.113.0/24}, deny: true}
  - {id: by-claim, when: {field: principal.claims.client_ip, cidr: 203.0.113.0/24}, deny: true}
  - {id: literal, when: {field: client.ip, equals: "64:ff9b:1:c000:2:2100::"}, deny: true}
tests:
  - name: a local NAT64 client is the IPv4 client it stands for
    client: {ip: "64:ff9b:1:cb00:71:700::"}
    expect: {decision: deny, rule: blocked-net}
"""


def test_cidr_matches_a_local_nat64_address_only_when_the_prefix_is_configured() -> None:
    """The gateway decodes 64:ff9b:1::/48 only when client_ip.nat64_prefixes lists it; the policy
    (CIDRs, IP literals, IP strings, test cases) must read addresses the same way either way."""
    settings = parse_settings(LOCAL_NAT64_SETTINGS, "gw.yaml")
    nat64 = settings.sections["client_ip"].nat64_prefixes
    configured, issues = compile_sources([Source("p.yaml", REGION_RULE)], settings=settings)
    assert configured is not None, [str(i) for i in issues]
    ctx = context_from_mapping({"client": {"ip": NAT64_LOCAL_CLIENT}}, nat64=nat64)
    assert str(ctx.client.ip) == "203.0.113.7"
    assert evaluate(configured, ctx).rule_id == "blocked-net"
    claim = {"principal": {"claims": {"client_ip": NAT64_LOCAL_CLIENT}}, "client": {"ip": "198.51.100.1"}}
    assert evaluate(configured, context_from_mapping(claim)).rule_id == "by-claim"
    literal = context_from_mapping({"client": {"ip": "192.0.2.33"}})
    assert evaluate(configured, literal).rule_id == "literal"
    assert [r.passed for r in run_tests(configured).results] == [True]

    unconfigured, _ = compile_sources([Source("p.yaml", REGION_RULE)])
    assert unconfigured is not None
    ctx = context_from_mapping({"client": {"ip": NAT64_LOCAL_CLIENT}})
    assert str(ctx.client.ip) == NAT64_LOCAL_CLIENT
    assert evaluate(unconfigured, ctx).matched == []
    assert evaluate(unconfigured, context_from_mapping(claim)).matched == []
    assert evaluate(unconfigured, literal).matched == []
    assert [r.passed for r in run_tests(unconfigured).results] == [False]


def test_a_cidr_inside_a_configured_nat64_prefix_is_warned_about_or_converted() -> None:
    settings = parse_settings("mock_upstream: {enabled: true}\nclient_ip:\n"
                              "  nat64_prefixes: [64:ff9b:1::/48, '2001:db8:1:2::/96']\n", "gw.yaml")
    text = ('version: 1\nrules:\n  - {id: r, when: {field: client.ip, cidr: ["64:ff9b:1:cb00::/56", '
            '"2001:db8:1:2::cb00:7100/120"]}, deny: true}\n')
    snapshot, issues = compile_sources([Source("p.yaml", text)], settings=settings)
    assert snapshot is not None
    assert [str(i) for i in issues] == [
        "p.yaml:3:44: warning: rules[0].when.cidr: '64:ff9b:1:cb00::/56' lies in the NAT64 prefix "
        "64:ff9b:1::/48 (client_ip.nat64_prefixes), whose clients are matched as the IPv4 address they "
        "carry, so this never matches; expected an IPv4 CIDR"
    ]
    # inside a configured /96 the CIDR is the IPv4 network it carries, as for 64:ff9b::/96
    assert evaluate(snapshot, context_from_mapping({"client": {"ip": "203.0.113.9"}})).rule_id == "r"
    _, plain = compile_sources([Source("p.yaml", text)])
    assert plain == []  # without the setting these are ordinary IPv6 networks


@pytest.mark.parametrize(("client_ip", "matched"), [
    ("203.0.113.9", ["compat-cidr"]),
    ("::203.0.113.9", ["compat-cidr"]),
    ("::1", ["loopback"]),
    ("0.0.0.1", []),
])
def test_ipv4_compatible_operands_agree_with_the_geoip_reading(client_ip: str, matched: list[str]) -> None:
    """MaxMind answers ::a.b.c.d as a.b.c.d, so the policy does too; ::1 stays the IPv6 loopback."""
    snapshot = compile_text("""version: 1
rules:
  - {id: compat-cidr, when: {field: client.ip, cidr: "::203.0.113.0/120"}, tag: a}
  - {id: loopback, when: {field: client.ip, cidr: "::1/128"}, tag: b}
""")
    assert evaluate(snapshot, context_from_mapping({"client": {"ip": client_ip}})).matched == matched


def test_asn_operands_and_test_case_asns_must_be_32_bit() -> None:
    text = "version: 1\nrules:\n  - {id: r, when: {field: client.asn, equals: 4294967296}, deny: true}\n"
    _, issues = compile_sources([Source("p.yaml", text)])
    assert [str(i) for i in issues] == [
        "p.yaml:3:47: rules[0].when.equals: 4294967296 is not an AS number, expected an integer from 0 "
        "to 4294967295"
    ]
    assert compile_text(text.replace("4294967296", "4294967295")).rules
    with pytest.raises(ConfigError, match="client.asn: -1 is not an AS number"):
        context_from_mapping({"client": {"asn": -1}})
    assert context_from_mapping({"client": {"asn": 4294967295}}).client.asn == 4294967295
