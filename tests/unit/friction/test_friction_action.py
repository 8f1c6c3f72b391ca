from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from gateway.friction.action import FRICTION_ACTION
from gateway.friction.model import (
    FROM_RISK,
    CapTokens,
    Combined,
    Degrade,
    DenySpec,
    FrictionAction,
    PowChallenge,
    Reverify,
    Tarpit,
)
from gateway.policy.builtin_actions import default_registry
from gateway.policy.compile import load_policy_dir
from gateway.policy.registry import CompileEnv
from gateway.yamlsource import ConfigError, Issues, Node


def parse(text: str) -> tuple[FrictionAction | None, list[str]]:
    issues = Issues()
    node = Node.parse(text, "p.yaml", issues)
    assert node is not None
    friction = node.child("friction")
    assert friction is not None
    value = FRICTION_ACTION.parse(friction, CompileEnv())
    return value, [str(i) for i in issues.errors]


def test_registered_as_policy_action() -> None:
    assert default_registry().actions["friction"].terminal is False


def test_full_action() -> None:
    value, errors = parse("friction:\n  challenge: {kind: pow, difficulty: from_risk}\n"
                          "  degrade: {strip_logprobs: true, cap_max_tokens: 512, fallback_model: small}\n"
                          "  tarpit: {first_byte_delay: 2s, tokens_per_second: 5}\n"
                          "  cap_tokens: {limit: 1000, per: 1h, key: cluster}\n  ttl: 1h\n")
    assert errors == []
    assert value is not None and value.pow == PowChallenge(FROM_RISK) and value.ttl == 3600.0
    assert value.tarpit == Tarpit(2.0, 5.0)
    assert value.cap_tokens is not None and value.cap_tokens.key == "cluster"
    assert FrictionAction.from_json(value.to_json()) == value


@pytest.mark.parametrize("text, message", [
    ("friction: true", "p.yaml:1:11: friction: expected a mapping with at least one of: cap_tokens, "
                       "challenge, "
                       "degrade, deny, tarpit, got boolean true"),
    ("friction: {ttl: 1h}", "p.yaml:1:11: friction: expected at least one of: cap_tokens, challenge, "
                            "degrade, "
                            "deny, tarpit"),
    ("friction: {tarpt: {first_byte_delay: 1s}}",
     "p.yaml:1:12: friction.tarpt: unknown key 'tarpt'; did you mean 'tarpit'?"),
    ("friction: {challenge: {kind: captcha}}",
     "p.yaml:1:24: friction.challenge.kind: unknown challenge kind 'captcha', expected pow or reverify"),
    ("friction: {challenge: {kind: pow, difficulty: 40}}",
     "p.yaml:1:47: friction.challenge.difficulty: expected a number of bits from 1 to 32 or 'from_risk', "
     "got 40"),
    ("friction: {challenge: {kind: reverify}}",
     "p.yaml:1:23: friction.challenge: missing required key 'url'"),
    ("friction: {challenge: {kind: reverify, url: ftp://x}}",
     "p.yaml:1:40: friction.challenge.url: expected an http:// or https:// URL, got 'ftp://x'"),
    ("friction: {degrade: {}}", "p.yaml:1:21: friction.degrade: expected at least one of: cap_max_tokens, "
                                "cap_thinking_budget, fallback_model, force_n1, strip_logprobs, "
                                "strip_reasoning"),
    ("friction: {degrade: {cap_max_tokens: 0}}",
     "p.yaml:1:22: friction.degrade.cap_max_tokens: expected a positive integer, got 0"),
    ("friction: {tarpit: {first_byte_delay: 5min}}",
     "p.yaml:1:39: friction.tarpit.first_byte_delay: expected a duration such as 250ms, 30s, 5m, 1h, 1d, "
     "1w or "
     "1mo, got '5min'"),
    ("friction: {tarpit: {first_byte_delay: 2m}}",
     "p.yaml:1:39: friction.tarpit.first_byte_delay: first_byte_delay must be between 0s and 60s, got '2m'"),
    ("friction: {cap_tokens: {limit: 10, per: 1h, key: org}}",
     "p.yaml:1:45: friction.cap_tokens.key: unknown key 'org', expected account or cluster"),
    ("friction: {deny: {status: 200}}",
     "p.yaml:1:19: friction.deny.status: status 200 is not an error, expected an HTTP status from 400 "
     "to 599"),
    ("friction: {deny: true, ttl: 0s}",
     "p.yaml:1:29: friction.ttl: ttl must be between 1s and 7.776e+06s, got '0s'"),
])
def test_errors_are_exact(text: str, message: str) -> None:
    value, errors = parse(text)
    assert value is None
    assert errors == [message]


def test_combination_rule() -> None:
    c = Combined()
    c.add("a", FrictionAction(pow=PowChallenge(12), degrade=Degrade(strip_logprobs=True, cap_max_tokens=900),
                              tarpit=Tarpit(1.0, 10.0)))
    c.add("b", FrictionAction(pow=PowChallenge(16), degrade=Degrade(strip_reasoning=True, cap_max_tokens=500,
                                                                    fallback_model="m2"), tarpit=Tarpit(3.0)))
    assert c.pow_difficulty == 16
    assert c.degrade == Degrade(True, True, False, 500, None, "m2")
    assert c.tarpit == Tarpit(3.0, 10.0)


@pytest.mark.parametrize("text, message", [
    ("friction: {tarpit: {first_byte_delay: 1000000000}}",
     "p.yaml:1:39: friction.tarpit.first_byte_delay: first_byte_delay must be between 0s and 60s, "
     "got 1000000000"),
    ("friction: {tarpit: {first_byte_delay: 1e9s}}",
     "p.yaml:1:39: friction.tarpit.first_byte_delay: first_byte_delay must be between 0s and 60s, "
     "got '1e9s'"),
    ("friction: {tarpit: {first_byte_delay: .inf}}",
     "p.yaml:1:39: friction.tarpit.first_byte_delay: first_byte_delay must be between 0s and 60s, got inf"),
    ("friction: {tarpit: {tokens_per_second: 0.001}}",
     "p.yaml:1:40: friction.tarpit.tokens_per_second: tokens_per_second must be between 1 and 10000, "
     "got 0.001"),
    ("friction: {tarpit: {tokens_per_second: .nan}}",
     "p.yaml:1:40: friction.tarpit.tokens_per_second: tokens_per_second must be between 1 and 10000, "
     "got nan"),
    ("friction: {tarpit: {tokens_per_second: 0}}",
     "p.yaml:1:40: friction.tarpit.tokens_per_second: tokens_per_second must be between 1 and 10000, got 0"),
])
def test_tarpit_is_bounded(text: str, message: str) -> None:
    value, errors = parse(text)
    assert value is None and errors == [message]


def test_a_tarpit_past_its_bounds_is_refused_when_the_policy_compiles(tmp_path: Path) -> None:
    """Not only the action parser: loading a policy directory reports the file and line."""
    (tmp_path / "10-slow.yaml").write_text(
        "version: 1\nrules:\n  - id: slow\n    when: {field: risk.score, gte: 0.9}\n"
        "    friction: {tarpit: {first_byte_delay: 1e9}}\n")
    with pytest.raises(ConfigError) as caught:
        load_policy_dir(tmp_path)
    assert [str(i) for i in caught.value.issues] == [
        "10-slow.yaml:5:43: rules[0].friction.tarpit.first_byte_delay: first_byte_delay "
        "must be between 0s and 60s, got '1e9'"]


def test_stored_actions_with_unknown_fields_still_apply() -> None:
    stored = {"tarpit": {"first_byte_delay": 2.0, "jitter": 0.5}, "deny": {"status": 403, "message": "x"}}
    assert FrictionAction.from_json(stored) == FrictionAction(tarpit=Tarpit(2.0), deny=DenySpec(403, "x"))


def combine(actions: list[tuple[str, FrictionAction]]) -> Combined:
    c = Combined()
    for rule_id, action in actions:
        c.add(rule_id, action)
    return c


def test_merged_effects_do_not_depend_on_the_order() -> None:
    actions = [("a", FrictionAction(pow=PowChallenge(), tarpit=Tarpit(1.0, 20.0),
                                    degrade=Degrade(strip_logprobs=True, cap_max_tokens=800))),
               ("b", FrictionAction(pow=PowChallenge(10), tarpit=Tarpit(4.0),
                                    degrade=Degrade(force_n1=True, cap_thinking_budget=2048))),
               ("c", FrictionAction(tarpit=Tarpit(0.5, 5.0), degrade=Degrade(cap_max_tokens=300),
                                    cap_tokens=CapTokens(100, 60.0)))]
    results = [combine(list(p)) for p in itertools.permutations(actions)]
    for c in results:
        assert c.pow_from_risk and c.pow_difficulty == 10
        assert c.tarpit == Tarpit(4.0, 5.0)
        assert c.degrade == Degrade(True, False, True, 300, 2048, None)
        assert c.caps == [("c", CapTokens(100, 60.0))] and c.deny is None and c.reverify is None


def test_first_deny_and_reverify_win_and_name_their_rule() -> None:
    c = combine([("rv1", FrictionAction(reverify=Reverify("https://one"))),
                 ("d1", FrictionAction(deny=DenySpec(451, "first"))),
                 ("rv2", FrictionAction(reverify=Reverify("https://two"))),
                 ("d2", FrictionAction(deny=DenySpec(403, "second")))])
    assert (c.deny, c.deny_rule) == (DenySpec(451, "first"), "d1")
    assert (c.reverify, c.reverify_rule) == (Reverify("https://one"), "rv1")
