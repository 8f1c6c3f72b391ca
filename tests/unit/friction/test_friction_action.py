from __future__ import annotations

import pytest

from gateway.friction.action import FRICTION_ACTION
from gateway.friction.model import FROM_RISK, Combined, Degrade, FrictionAction, PowChallenge, Tarpit
from gateway.policy.builtin_actions import default_registry
from gateway.policy.registry import CompileEnv
from gateway.yamlsource import Issues, Node


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
