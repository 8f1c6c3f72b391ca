"""Policy evaluation time per request for 1, 100, 1,000 and 10,000 rules.

    .venv/bin/python bench/policy_eval.py [--requests 20000] [--sizes 1 100 1000 10000]

The generated rule sets look like real large policy sets: most rules are keyed on one account,
org, model or country (so the index applies), plus up to 10 unkeyed rules (risk thresholds,
header regexes, anonymiser flags) that every request must test, and at most 50 country-keyed
rules (a country bucket holds every rule keyed on it, so thousands of rules keyed on a handful
of countries would all be candidates: keep such rules few, or key them on a narrower field).
Requests are drawn from a pool
of varied contexts; most match nothing terminal, so evaluation runs to the default (worst case).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.context import RequestContext  # noqa: E402
from gateway.policy.compile import Source, compile_sources  # noqa: E402
from gateway.policy.evaluate import evaluate  # noqa: E402
from gateway.policy.testing import context_from_mapping  # noqa: E402

COUNTRIES = ["US", "GB", "DE", "FR", "JP", "BR", "IN", "CA", "AU", "NL", "SE", "KR", "MX", "ES", "IT"]
UNKEYED = [
    "{field: risk.score, gte: 0.97}",
    "{field: client.is_tor_exit_node, equals: true}",
    "{field: request.headers.user-agent, regex: '^python-requests/'}",
    "{all: [{field: risk.cluster_size, gte: 50}, {field: risk.cluster_score, gte: 0.9}]}",
    "{field: request.max_tokens, gt: 32000}",
    "{field: principal.claims.scope, in: [admin, internal]}",
    "{field: client.ip, cidr: [198.18.0.0/15, '2001:db8::/32']}",
    "{field: time.hour, lt: 1}",
    "{not: {field: principal.authenticated, equals: true}}",
    "{field: request.n, gt: 8}",
]


def rule_text(i: int) -> str:
    if i < len(UNKEYED):
        return f"  - id: r{i}\n    when: {UNKEYED[i]}\n    tag: t{i}\n"
    kind = i % 4
    if kind == 0:
        when = f"{{all: [{{field: principal.account, equals: acct_{i}}}, {{field: request.n, gt: 2}}]}}"
        action = "deny: true"
    elif kind == 1:
        when = (
            f"{{all: [{{field: request.model, equals: model-{i}}}, {{field: principal.tier, equals: free}}]}}"
        )
        action = "deny: true"
    elif kind == 2:
        when = (
            f"{{all: [{{field: principal.org, equals: org_{i}}}, {{field: request.stream, equals: true}}]}}"
        )
        action = f"tag: org{i}"
    elif i < 200:
        # Country rules are few in real sets (there are only 249 countries); see the docstring.
        country = COUNTRIES[i % len(COUNTRIES)]
        when = (
            f"{{all: [{{field: client.country, equals: {country}}}, "
            f"{{field: request.max_tokens, gt: {1000 + i}}}]}}"
        )
        action = f"tag: c{i}"
    else:
        when = (
            f"{{all: [{{field: client.asn, in: [{i}, {i + 1}]}}, {{field: request.stream, equals: true}}]}}"
        )
        action = f"tag: asn{i}"
    return f"  - id: r{i}\n    when: {when}\n    {action}\n"


def build(n: int) -> object:
    text = "version: 1\nrules:\n" + "".join(rule_text(i) for i in range(n))
    snapshot, issues = compile_sources([Source("bench.yaml", text)])
    if snapshot is None:
        raise SystemExit("\n".join(map(str, issues[:5])))
    return snapshot


def contexts(n: int, rng: random.Random) -> list[RequestContext]:
    out = []
    for _ in range(500):
        i = rng.randrange(max(n, 1))
        out.append(
            context_from_mapping(
                {
                    "request": {
                        "model": f"model-{rng.randrange(max(n, 1))}",
                        "max_tokens": rng.choice([256, 1024, 4096]),
                        "stream": rng.random() < 0.5,
                        "headers": {"user-agent": "openai-python/1.40"},
                    },
                    "principal": {
                        "account": f"acct_{i}",
                        "org": f"org_{rng.randrange(max(n, 1))}",
                        "tier": rng.choice(["free", "pro", "enterprise"]),
                    },
                    "client": {
                        "ip": f"203.0.113.{rng.randrange(1, 255)}",
                        "country": rng.choice(COUNTRIES),
                        "asn": rng.randrange(max(n, 1)),
                    },
                    "risk": {"score": rng.random() * 0.9},
                    "time": "2025-03-04T12:00:00Z",
                }
            )
        )
    return out


def measure(n: int, requests: int, rng: random.Random) -> tuple[float, float, int]:
    snapshot = build(n)
    pool = contexts(n, rng)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for k in range(requests):
            evaluate(snapshot, pool[k % len(pool)])  # type: ignore[arg-type]
        rounds.append((time.perf_counter() - start) / requests * 1e6)
    candidates = statistics.mean(len(snapshot.index.candidates(c)) for c in pool)  # type: ignore[attr-defined]
    return min(rounds), statistics.median(rounds), round(candidates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1_000, 10_000])
    args = parser.parse_args()
    rng = random.Random(7)
    print(f"python {sys.version.split()[0]}, {args.requests} evaluations per round, best/median of 5")
    print(f"{'rules':>7} {'best µs':>9} {'median µs':>10} {'candidates':>11}")
    for n in args.sizes:
        best, median, cand = measure(n, args.requests, rng)
        print(f"{n:>7} {best:>9.2f} {median:>10.2f} {cand:>11}")


if __name__ == "__main__":
    main()
