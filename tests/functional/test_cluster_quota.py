"""Cluster-keyed quotas through the real gateway: risk stage on, the shipped
``policies/50-cluster-quota.yaml`` rule (limits scaled down), the official OpenAI SDK.

A campaign opens one fresh account per request, all sending one chain-of-thought template from
one cloud /24. Each account stays far under its own limit; once the accounts form a cluster they
share one bucket, and new accounts of the campaign are refused with OpenAI's 429. An ordinary user
on another network, and a benign neighbour on the campaign's own /24, keep being served.

The TCP peer is always 127.0.0.1, trusted as one proxy hop, so ``X-Forwarded-For`` gives each
client its address; a generated ASN database puts the campaign's /24 in one ASN.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import RunningGateway, gateway_yaml, run_gateway, write_keys_file
from tests.support.mmdb import write_asn_db
from tests.support.ratelimit_fields import parse_structured

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "50-cluster-quota.yaml"
CLUSTER_RPH = 4  # the shipped 300 requests an hour, scaled down (burst = limit: back to back)
ACCOUNT_RULE = """\
version: 1
rules:
  - id: account-rpm
    description: The per-account limit every campaign account stays far under.
    quota:
      limits:
        - {name: rpm, kind: requests, limit: 20, per: 1m, burst: 20, key: [principal.account]}
"""
# Clusters count from 3 entities and are full at 6 (defaults 5 and 30), so that the cluster
# forms within a few accounts: score = ramp(size, (2, 6)) with full evidence, 0.5 at 4 accounts.
RISK = "risk: {cluster: {min_accounts: 3, full_accounts: 6}}\n"

TEMPLATE = ("Solve the following problem carefully. {q} Think step by step and write out your full "
            "chain of thought before the final answer.")
QUESTIONS = [
    "A train leaves Leeds at 9 and travels {n}0 km at 80 km/h. When does it arrive?",
    "What is {n} times 23?",
    "A rectangle is {n} by 12. What is its area?",
    "If {n} apples cost 45 cents, what do 11 apples cost?",
    "How many primes are below {n}0?",
    "A tank fills at {n} litres a minute. How long until 96 litres?",
]
FARM = 12  # campaign accounts, one request each
CAMPAIGN_NET = "198.51.100"  # one /24 in a hosting ASN
ORDINARY_IP = "192.0.2.44"  # another network, another ASN
NEIGHBOUR_IP = "198.51.100.200"  # a benign user on the campaign's /24


def farm_key(i: int) -> str:
    return f"tg_test_farm_key_{i:04d}"


ORDINARY_KEY = "tg_test_ordinary_key_0001"
NEIGHBOUR_KEY = "tg_test_neighbour_key_0001"
ORDINARY_PROMPT = "Could you suggest a name for my new bakery in the old town?"
NEIGHBOUR_PROMPT = "What should I plant in a shady garden this autumn?"


def cluster_policy() -> str:
    """The shipped rule, conditions and keys untouched, with its request budget scaled down."""
    doc = yaml.safe_load(SHIPPED.read_text())
    (rule,) = doc["rules"]
    requests = [lim for lim in rule["quota"]["limits"] if lim["kind"] == "requests"]
    assert requests and all(lim["key"] == ["risk.cluster_id"] for lim in rule["quota"]["limits"])
    for lim in requests:
        lim.update(limit=CLUSTER_RPH, burst=CLUSTER_RPH)
    return yaml.safe_dump(doc, sort_keys=False)


def client(gw: RunningGateway, key: str, ip: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0,
                              default_headers={"X-Forwarded-For": ip})


def messages(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]



def extra(record: dict[str, Any]) -> dict[str, Any]:
    value = record["extra"]
    assert isinstance(value, dict)
    return value


def matched(record: dict[str, Any]) -> list[str]:
    value = record["matched_rules"]
    assert isinstance(value, list)
    return value


@pytest.fixture
async def gw(mock_upstream: MockServer, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    keys: dict[str, dict[str, object]] = {
        farm_key(i): {"account": f"acct-farm-{i}", "tier": "free"} for i in range(FARM)
    }
    keys[ORDINARY_KEY] = {"account": "acct-ordinary", "tier": "free"}
    keys[NEIGHBOUR_KEY] = {"account": "acct-neighbour", "tier": "free"}
    keys_file = write_keys_file(tmp_path, keys)
    asn_db = write_asn_db(tmp_path / "asn.mmdb", {f"{CAMPAIGN_NET}.0/24": (64496, "Example Cloud"),
                                                  "192.0.2.0/24": (64511, "Example Broadband")})
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-account.yaml").write_text(ACCOUNT_RULE)
    (policies / SHIPPED.name).write_text(cluster_policy())
    extra_yaml = (
        f"identity: {{keys_file: {keys_file}}}\n"
        f"client_ip: {{trusted_proxies: {json.dumps(['127.0.0.1/32'])}}}\n"
        f"geoip: {{asn_db: {asn_db}}}\n"
        f"policies: {{dir: {policies}, watch: false}}\n" + RISK
    )
    text = gateway_yaml(mock_upstream.url, tmp_path, extra_yaml, audit_log=tmp_path / "audit.jsonl")
    async with run_gateway(text, tmp_path) as running:
        yield running


async def test_farmed_accounts_share_one_cluster_budget(gw: RunningGateway) -> None:
    served: list[int] = []  # campaign accounts served
    remaining: dict[int, str] = {}  # cluster budget left after each served account, from RateLimit
    refused: dict[int, openai.RateLimitError] = {}
    for i in range(FARM):
        prompt = TEMPLATE.format(q=QUESTIONS[i % len(QUESTIONS)].format(n=i + 7))
        async with client(gw, farm_key(i), f"{CAMPAIGN_NET}.{10 + i}") as c:
            try:
                raw = await c.chat.completions.with_raw_response.create(model="gpt-test",
                                                                        messages=messages(prompt))
            except openai.RateLimitError as exc:
                refused[i] = exc
                continue
        assert raw.http_response.status_code == 200
        served.append(i)
        state = parse_structured(raw.headers["RateLimit"])
        if "rph" in state:
            remaining[i] = state["rph"]["r"]
            policy = parse_structured(raw.headers["RateLimit-Policy"])
            assert policy["rph"] == {"q": str(CLUSTER_RPH), "w": "3600", "qu": '"requests"'}

    # An account the campaign already used is refused too: the budget is the cluster's.
    first_charged = min(remaining)
    async with client(gw, farm_key(first_charged), f"{CAMPAIGN_NET}.{10 + first_charged}") as c:
        with pytest.raises(openai.RateLimitError) as again:
            await c.chat.completions.create(model="gpt-test", messages=messages(
                TEMPLATE.format(q="What is 19 times 21?")))

    # An ordinary user on another network, more requests than the cluster budget: all served.
    async with client(gw, ORDINARY_KEY, ORDINARY_IP) as c:
        for _ in range(CLUSTER_RPH + 2):
            raw = await c.chat.completions.with_raw_response.create(
                model="gpt-test", messages=messages(ORDINARY_PROMPT))
            assert raw.http_response.status_code == 200
            assert "rph" not in parse_structured(raw.headers["RateLimit"])
    # A benign neighbour on the campaign's /24 is in the network's cluster, but does not behave
    # like it (no chain-of-thought, no request shape): not charged to it.
    async with client(gw, NEIGHBOUR_KEY, NEIGHBOUR_IP) as c:
        for _ in range(CLUSTER_RPH + 2):
            raw = await c.chat.completions.with_raw_response.create(
                model="gpt-test", messages=messages(NEIGHBOUR_PROMPT))
            assert raw.http_response.status_code == 200
    records = await gw.audit_records()

    # The cluster formed at the 4th account (3 to count, 4 for a score of 0.5); from there the
    # accounts shared CLUSTER_RPH requests; every later new account was refused.
    assert served == list(range(3 + CLUSTER_RPH))
    assert remaining == {3 + k: str(CLUSTER_RPH - 1 - k) for k in range(CLUSTER_RPH)}
    assert sorted(refused) == list(range(3 + CLUSTER_RPH, FARM))
    for err in [*refused.values(), again.value]:
        assert err.status_code == 429 and err.code == "rate_limit_exceeded"
        assert isinstance(err.body, dict) and err.body["type"] == "requests"  # OpenAI's 429 shape
        headers = err.response.headers
        assert 1 <= int(headers["Retry-After"]) <= 3600 // CLUSTER_RPH  # one slot per 15 min
        assert headers.get("x-should-retry") != "false"
        assert parse_structured(headers["RateLimit"])["rph"]["r"] == "0"

    campaign = records[:FARM + 1]
    ordinary = records[FARM + 1:FARM + 1 + CLUSTER_RPH + 2]
    neighbour = records[FARM + 1 + CLUSTER_RPH + 2:]
    assert len(neighbour) == CLUSTER_RPH + 2
    assert [r["status"] for r in campaign] == [200] * len(served) + [429] * (len(refused) + 1)
    # One bucket: every charged or refused campaign request was in the same template cluster.
    charged = [r for r in campaign if "cluster-quota" in matched(r)]
    assert len(charged) == CLUSTER_RPH + len(refused) + 1
    cluster_ids = {extra(r)["risk"]["cluster_id"] for r in charged}
    assert len(cluster_ids) == 1 and next(iter(cluster_ids)).startswith("t:"), cluster_ids
    for r in campaign:
        if r["status"] == 429:
            assert r["rule_id"] == "cluster-quota" and r["error_type"] == "rate_limit"
            assert extra(r)["quota"]["denied"] == ["cluster-quota/rph"]  # not the account's limit
    # Every campaign account stayed far under its own limit: one request each (two for one).
    account_left = [lim["remaining"] for r in campaign for lim in extra(r)["quota"]["limits"]
                    if lim["rule"] == "account-rpm"]
    assert min(account_left) >= 18

    for r in ordinary:
        assert r["status"] == 200 and extra(r)["risk"]["cluster_id"] is None
        assert matched(r) == ["account-rpm"]
    for r in neighbour:
        assert r["status"] == 200 and extra(r)["risk"]["cluster_id"] == f"p:{CAMPAIGN_NET}.0/24"
        assert matched(r) == ["account-rpm"]
