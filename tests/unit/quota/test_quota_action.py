"""The quota action's YAML: one case per error kind, each asserting the exact message."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.context import ApiFamily, ClientInfo, Principal, RequestContext, RequestView
from gateway.policy.registry import CompileEnv
from gateway.quota.action import QuotaActionSpec
from gateway.quota.limits import LimitKind, QuotaAction
from gateway.quota.settings import Price, QuotaSettings
from gateway.store.breaker import FailureMode
from gateway.yamlsource import Issues, Node


def parse(text: str, env: CompileEnv | None = None) -> tuple[QuotaAction | None, list[str]]:
    issues = Issues()
    node = Node.parse(text, "p.yaml", issues)
    assert node is not None
    quota = node.child("quota")
    assert quota is not None
    action = QuotaActionSpec().parse(quota, env or CompileEnv())
    return action, [str(i) for i in issues.items]


ERRORS = [
    pytest.param(
        'quota: 5\n',
        [
            "p.yaml:1:8: quota: expected a mapping with 'limits', got int 5",
        ],
        id='notmap'),
    pytest.param(
        'quota:\n  limit: []\n',
        [
            "p.yaml:2:3: quota.limit: unknown key 'limit'; did you mean 'limits'?",
            "p.yaml:2:3: quota: missing required key 'limits'",
        ],
        id='unknown_top'),
    pytest.param(
        'quota:\n  on_store_failure: maybe\n  limits: [{name: a, kind: requests, limit: 1, per: 1s}]\n',
        [
            "p.yaml:2:3: quota.on_store_failure: unknown failure mode 'maybe'; expected one of: closed, loc"
            'al, open',
        ],
        id='mode'),
    pytest.param(
        'quota:\n  limits: []\n',
        [
            'p.yaml:2:11: quota.limits: expected a non-empty list of limits, got an empty list',
        ],
        id='empty'),
    pytest.param(
        'quota:\n  limits: {name: a}\n',
        [
            'p.yaml:2:11: quota.limits: expected a non-empty list of limits, got a mapping',
        ],
        id='notlist'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1s, brust: 2}\n',
        [
            "p.yaml:3:52: quota.limits[0].brust: unknown key 'brust'; did you mean 'burst'?",
        ],
        id='unknown_key'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, per: 1s}\n',
        [
            "p.yaml:3:7: quota.limits[0]: missing required key 'kind'",
            "p.yaml:3:7: quota.limits[0]: missing required key 'limit'",
        ],
        id='missing'),
    pytest.param(
        "quota:\n  limits:\n    - {name: 'a b', kind: requests, limit: 1, per: 1s}\n",
        [
            "p.yaml:3:8: quota.limits[0].name: limit name must be 1-64 of [A-Za-z0-9_.-], got 'a b'",
        ],
        id='badname'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1s}\n'
        '    - {name: a, kind: requests, limit: 2, per: 1s}\n',
        [
            "p.yaml:4:8: quota.limits[1].name: duplicate limit name 'a'",
        ],
        id='dupname'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: input_token, limit: 1, per: 1s}\n',
        [
            "p.yaml:3:17: quota.limits[0].kind: unknown kind 'input_token'; did you mean 'input_tokens'?",
        ],
        id='kind'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 0, per: 1s}\n',
        [
            'p.yaml:3:40: quota.limits[0].limit: expected a positive integer, got 0',
        ],
        id='limit0'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: total_tokens, limit: lots, per: 1s}\n',
        [
            "p.yaml:3:44: quota.limits[0].limit: expected a positive integer, got string 'lots'",
        ],
        id='limitstr'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: spend, limit: -5, per: 1d}\n',
        [
            'p.yaml:3:37: quota.limits[0].limit: expected a positive amount in USD, got -5',
        ],
        id='spendneg'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1}\n',
        [
            "p.yaml:3:7: quota.limits[0]: missing required key 'per'",
        ],
        id='noper'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: soon}\n',
        [
            'p.yaml:3:48: quota.limits[0].per: expected a duration such as 250ms, 30s, 5m, 1h, 1d, 1w or 1m'
            "o, got 'soon'",
        ],
        id='badper'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 500ms}\n',
        [
            "p.yaml:3:48: quota.limits[0].per: 'per' must be between 1s and 1mo, got '500ms'",
        ],
        id='shortper'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 2mo}\n',
        [
            "p.yaml:3:48: quota.limits[0].per: 'per' must be between 1s and 1mo, got '2mo'",
        ],
        id='longper'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: concurrency, limit: 1, per: 1m}\n',
        [
            "p.yaml:3:46: quota.limits[0].per: 'per' does not apply to kind 'concurrency' (see 'lease_ttl')",
        ],
        id='perconc'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: total_tokens, limit: 1, per: 1m, burst: 3}\n',
        [
            "p.yaml:3:56: quota.limits[0].burst: 'burst' applies only to kind 'requests'",
        ],
        id='burstkind'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1m, burst: 0}\n',
        [
            'p.yaml:3:59: quota.limits[0].burst: expected a positive integer, got 0',
        ],
        id='burst0'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1m, lease_ttl: 1m}\n',
        [
            "p.yaml:3:52: quota.limits[0].lease_ttl: 'lease_ttl' applies only to kind 'concurrency'",
        ],
        id='leasekind'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: concurrency, limit: 1, lease_ttl: 2d}\n',
        [
            "p.yaml:3:57: quota.limits[0].lease_ttl: expected a duration between 1s and 1d, got '2d'",
        ],
        id='badlease'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1m, key: {a: 1}}\n',
        [
            'p.yaml:3:57: quota.limits[0].key: expected a list of context fields, got a mapping',
        ],
        id='keytype'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1m, key: [principal.acount]}\n',
        [
            "p.yaml:3:58: quota.limits[0].key[0]: unknown key field 'principal.acount'; did you mean 'princ"
            "ipal.account'?",
        ],
        id='keyfield'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1m, key: [weather]}\n',
        [
            "p.yaml:3:58: quota.limits[0].key[0]: unknown key field 'weather'; expected one of: client.asn,"
            ' client.country, client.ip, client.ip_prefix, principal.account, principal.attributes.<name>, '
            'principal.claims.<name>, principal.key_id, principal.org, principal.source, principal.tier, re'
            'quest.api, request.model, request.route, risk.cluster_id, risk.template_id',
        ],
        id='keyfield2'),
    pytest.param(
        'quota:\n  limits:\n'
        '    - {name: a, kind: requests, limit: 1, per: 1m, key: [client.ip, client.ip]}\n',
        [
            "p.yaml:3:69: quota.limits[0].key[1]: duplicate key field 'client.ip'",
        ],
        id='keydup'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: requests, limit: 1, per: 1m, key: [5]}\n',
        [
            'p.yaml:3:58: quota.limits[0].key[0]: expected a context field name, got int 5',
        ],
        id='keynotstr'),
    pytest.param(
        'quota:\n  limits:\n    - {name: a, kind: spend, limit: 5, per: 1d}\n',
        [
            'p.yaml:3:37: quota.limits[0].limit: spend limits need a price table (quota.prices in the gatew'
            'ay config)',
        ],
        id='spendnoprice'),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_error_messages(text: str, expected: list[str]) -> None:
    action, errors = parse(text, CompileEnv(settings=QuotaSettings()))  # no price table
    assert action is None
    assert errors == expected


def test_valid_action_compiles_frozen_limits() -> None:
    action, errors = parse(
        "quota:\n"
        "  on_store_failure: closed\n"
        "  limits:\n"
        "    - {name: rpm, kind: requests, limit: 60, per: 1m, burst: 10, key: [principal.account]}\n"
        "    - {name: tpd, kind: total_tokens, limit: 100000, per: 1d, key: client.ip_prefix}\n"
        "    - {name: usd, kind: spend, limit: 2.5, per: 1mo}\n"
        "    - {name: conc, kind: concurrency, limit: 4, lease_ttl: 5m}\n",
        CompileEnv(settings=QuotaSettings(prices=(("*", Price(1, 2)),))))
    assert errors == [] and action is not None
    assert action.on_store_failure is FailureMode.CLOSED
    rpm, tpd, usd, conc = action.limits
    assert (rpm.kind, rpm.limit, rpm.period, rpm.burst) == (LimitKind.REQUESTS, 60, 60.0, 10)
    assert tpd.key_fields == ("client.ip_prefix",) and tpd.period == 86400.0
    assert usd.limit == 2_500_000 and usd.period == 30 * 86400.0  # micro-USD
    assert conc.period is None and conc.lease_ttl == 300.0
    with pytest.raises(AttributeError):
        rpm.limit = 1  # type: ignore[misc]


def test_identity_excludes_numbers_and_escapes_values() -> None:
    """Same (rule, name, kind, key) → same store key, whatever the numbers: state survives a
    reload and new numbers apply at once."""
    ctx = RequestContext("r", RequestView(ApiFamily.OPENAI, "chat", "/", "POST", {}),
                         principal=Principal(account="a|b{c}"),
                         client=ClientInfo(ip=ipaddress.ip_address("203.0.113.77")))
    old, _ = parse("quota:\n  limits: [{name: rpm, kind: requests, limit: 60, per: 1m, "
                   "key: [principal.account, client.ip_prefix]}]\n")
    new, _ = parse("quota:\n  limits: [{name: rpm, kind: requests, limit: 5, per: 1h, burst: 3, "
                   "key: [principal.account, client.ip_prefix]}]\n")
    assert old is not None and new is not None
    key = old.limits[0].identity("rule-1", ctx)
    assert key == new.limits[0].identity("rule-1", ctx)
    assert key == "q|rule-1|rpm|requests|principal.account=a%7Cb%7Bc%7D|client.ip_prefix=203.0.113.0/24"
    assert old.limits[0].identity("rule-2", ctx) != key


def test_ipv6_prefix_is_a_48() -> None:
    ctx = RequestContext("r", RequestView(ApiFamily.OPENAI, "chat", "/", "POST", {}),
                         client=ClientInfo(ip=ipaddress.ip_address("2001:db8:1:2::9")))
    action, _ = parse("quota:\n  limits: [{name: a, kind: requests, limit: 1, per: 1s, "
                      "key: [client.ip_prefix, principal.account]}]\n")
    assert action is not None
    identity = action.limits[0].identity("r", ctx)
    assert identity.endswith("client.ip_prefix=2001:db8:1::/48|principal.account=~")


def test_identity_escapes_every_part_as_the_store_keys_always_have() -> None:
    """Store keys must not change across upgrades (quota state would reset): every part escaped,
    rule id and limit name included, then joined by '|'."""
    ctx = RequestContext("r", RequestView(ApiFamily.OPENAI, "chat", "/", "POST", {}),
                         principal=Principal(account="100%{x}", org=None))
    action, _ = parse("quota:\n  limits: [{name: per-acct, kind: input_tokens, limit: 9, per: 1d, "
                      "key: [principal.account, principal.org]}]\n")
    assert action is not None
    limit = action.limits[0]

    def reference(rule_id: str) -> str:
        parts = ["q", rule_id, "per-acct", "input_tokens", "principal.account=100%{x}", "principal.org=~"]
        return "|".join(p.replace("%", "%25").replace("|", "%7C").replace("{", "%7B").replace("}", "%7D")
                        for p in parts)

    for rule_id in ("plain", "odd|rule{1}%", "plain"):  # the second "plain" comes from the template
        assert limit.identity(rule_id, ctx) == reference(rule_id)
