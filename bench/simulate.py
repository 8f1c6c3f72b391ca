"""Distillation-defence simulator: synthetic populations through a real gateway over HTTP.

    .venv/bin/python bench/simulate.py [--scale 1.0] [--seed 1] [--json out.json]

Starts the mock upstream and a gateway (``create_app``) on free ports; the gateway's stages are
replaced by: a simulation identity stage (account, tier, org, age and virtual time from
``x-sim-*`` headers), the real ClientIpStage (127.0.0.1 trusted, ``X-Forwarded-For``), GeoStage
over a StaticGeoProvider (ASNs, hosting/proxy flags), RiskStage, MatchStage (a friction policy)
and FrictionStage. Time is virtual: every request carries its simulated time and the signal
store reads it, so a day of traffic runs in a minute.

Phase 1 sends benign traffic only (no friction) and sets the threshold just above the highest
score any benign account reached. Phase 2 replays benign traffic plus the campaigns against a
``friction: {challenge: pow}`` rule at that threshold. Campaign clients do not solve challenges,
so a challenged request is a request the campaign did not get. Prompts are read at run time from
../shared/prompts (never copied into the repo).

``--store behind`` runs the signal store as a production Redis deployment does by default
(``gateway/risk/behind.py``): accounts already seen answered from a local mirror, writes sent
behind; ``--store-latency`` delays every store call (the round trip), so the lag is that of
concurrent requests during one round trip. The virtual clock cannot run inside Redis, so the
mirror's effect on detection is measured over the memory store it wraps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import create_app
from gateway.context import Decision, RequestContext
from gateway.geo.base import GeoRecord
from gateway.geo.static import StaticGeoProvider
from gateway.ipaddr import CidrSet
from gateway.policy.compile import Source, compile_sources
from gateway.policy.evaluate import Snapshot
from gateway.risk.behind import BehindSignalStore
from gateway.risk.settings import ChallengeSettings, RiskSettings
from gateway.risk.sigstore import BatchResult, MemorySignalStore, Op, SignalStore
from gateway.settings import parse_settings
from gateway.stages.client_ip import ClientIpStage
from gateway.stages.friction import FrictionStage
from gateway.stages.geo import GeoStage
from gateway.stages.match import MatchStage
from gateway.stages.risk import RiskStage
from gateway.store.memory import MemoryStore
from gateway.upstream.mock_server import MockOptions, serve_mock

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts"
START = 1_767_225_600.0
POLICY = """\
version: 1
rules:
  - id: distillation-pow
    description: High distillation risk must solve a proof of work (sticky for a day).
    when: {{field: risk.score, gte: {threshold}}}
    friction: {{challenge: {{kind: pow, difficulty: from_risk}}, ttl: 1d}}
"""


@dataclass(slots=True)
class Event:
    t: float
    account: str
    population: str
    body: dict[str, Any]
    headers: dict[str, str]


COT_TEMPLATES = ["Solve the following math problem. {q} Let's think step by step and show your work.",
                 "{q}\nExplain your chain of thought, then give the final answer after ####."]
PARA_PREFIX = ["Here is a question.", "Consider this problem:", "Please help me with this:", "Task:",
               "I have a homework question.", "Quick puzzle for you.", "Try this one.", "Question below."]
PARA_SUFFIX = ["Walk me through your reasoning.", "Show all your working.",
               "Think it through one step at a time.",
               "Write out every intermediate step.", "Reason carefully before answering.",
               "Lay out your reasoning, then answer.", "Explain how you got the answer.",
               "Justify each step."]
AGENT_SYSTEM = ("You are CodePilot, an autonomous coding agent. You can read files, run tests and "
                "propose patches. "
                "Always answer with a plan followed by a unified diff.")


def geo_table() -> dict[str, GeoRecord]:
    table: dict[str, GeoRecord] = {}
    for i in range(10):  # residential ISPs, with residential-proxy exit blocks inside them
        table[f"100.{64 + i}.0.0/16"] = GeoRecord(country="US", asn=7001 + i, as_org=f"isp{i}")
        table[f"100.{64 + i}.250.0/24"] = GeoRecord(country="US", asn=7001 + i, is_residential_proxy=True)
    for i in range(4):  # two clouds
        table[f"52.{i}.0.0/16"] = GeoRecord(country="US", asn=9001 + i % 2, is_hosting_provider=True)
    return table


def _synthetic_maths(rng: random.Random, n: int = 1000) -> list[str]:
    """Stand-ins for GSM8K when ../shared/prompts is absent (results then differ from the docs)."""
    shapes = ["A farmer has {a} cows and buys {b} more. How many cows does the farmer have now?",
              "{name} reads {a} pages a day for {b} days. How many pages does {name} read?",
              "A shop sells {a} apples in the morning and {b} in the afternoon. How many in total?",
              "{name} had {a} dollars and spent {b}. How much money is left?",
              "A train travels {a} miles an hour for {b} hours. How far does it go?"]
    names = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana"]
    return [rng.choice(shapes).format(a=rng.randint(2, 99), b=rng.randint(2, 99), name=rng.choice(names))
            for _ in range(n)]


def _synthetic_requests(rng: random.Random, n: int = 300) -> list[str]:
    """Stand-ins for the human-written instructions when ../shared/prompts is absent."""
    verbs = ["Write", "Summarise", "Translate into French", "Explain to a child", "Give three ideas for",
             "Draft an email about", "List the pros and cons of", "Suggest a title for"]
    topics = ["a trip to the mountains", "our quarterly budget", "how tides work", "a birthday party",
              "learning the guitar", "a new coffee shop", "remote work", "composting at home",
              "the history of the bicycle", "a job interview"]
    return [f"{rng.choice(verbs)} {rng.choice(topics)}." for _ in range(n)]


def _load(name: str) -> list[dict[str, Any]]:
    path = PROMPTS / name
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


class Builder:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        users = _load("user-oriented-instructions.jsonl") + _load("self-instruct-seed-tasks.jsonl")
        self.user = [f"{u['instruction']}\n{u['instances'][0]['input'] if u.get('instances') else ''}".strip()
                     for u in users] or _synthetic_requests(self.rng)
        self.maths = [q["question"] for q in _load("gsm8k-test.jsonl")] or _synthetic_maths(self.rng)
        self.events: list[Event] = []

    def emit(self, t: float, account: str, pop: str, created: float, messages: list[dict[str, str]], ip: str,
             tier: str = "free", org: str = "", **extra: Any) -> None:
        headers = {"x-sim-time": f"{t:.3f}", "x-sim-account": account, "x-sim-tier": tier, "x-sim-org": org,
                   "x-sim-created": f"{created:.0f}", "x-forwarded-for": ip, "authorization": "Bearer sim"}
        body = {"model": "sim-model", "messages": list(messages), "max_tokens": 512, **extra}
        self.events.append(Event(t, account, pop, body, headers))

    def ordinary(self, n: int) -> None:
        rng = self.rng
        for a in range(n):
            acct, isp = f"user{a}", rng.randrange(10)
            ip = f"100.{64 + isp}.{rng.randrange(250)}.{rng.randrange(1, 255)}"
            created = START - (rng.uniform(0, 7) if rng.random() < 0.05 else rng.uniform(7, 400)) * 86400
            tier = "pro" if rng.random() < 0.3 else "free"
            for _s in range(rng.randint(1, 4)):
                t = START + rng.uniform(0, 86400)
                history: list[dict[str, str]] = []
                cot = rng.random() < 0.06
                for _turn in range(rng.randint(1, 8)):
                    text = rng.choice(self.user) + (" Please explain step by step." if cot else "")
                    history.append({"role": "user", "content": text})
                    self.emit(t, acct, "ordinary", created, history, ip, tier)
                    history.append({"role": "assistant", "content": "(answer)"})
                    t += rng.lognormvariate(4.0, 0.8)

    def heavy(self, scale: float) -> None:
        rng = self.rng
        for a in range(max(1, round(4 * scale))):  # enterprise eval harness in the cloud, CoT prompts
            t, ip = START + rng.uniform(0, 40000), f"52.0.7.{10 + a}"
            for q in rng.sample(self.maths, min(300, len(self.maths))):
                self.emit(t, f"evalcorp{a}", "heavy_eval", START - 300 * 86400,
                          [{"role": "user", "content": f"Q: {q}\nA: Let's think step by step."}], ip,
                          "enterprise", "evalcorp")
                t += rng.uniform(2.7, 3.3)
        for a in range(max(1, round(20 * scale))):  # coding-agent users: one shared system prompt
            ip = f"100.{64 + rng.randrange(10)}.{rng.randrange(250)}.{rng.randrange(1, 255)}"
            for _s in range(3):
                t = START + rng.uniform(0, 80000)
                history = [{"role": "system", "content": AGENT_SYSTEM}]
                for _turn in range(rng.randint(10, 30)):
                    step = "Tool result / next step: " + rng.choice(self.user)
                    history.append({"role": "user", "content": step})
                    self.emit(t, f"coder{a}", "heavy_agent", START - 90 * 86400, history, ip, "pro",
                              f"org{a}")
                    history.append({"role": "assistant", "content": "(plan and diff)"})
                    t += rng.uniform(4, 30)

    def campaign(self, name: str, n: int, ips: list[str], gap: tuple[float, float], blend: float,
                 paraphrase: bool, template: str, **extra: Any) -> None:
        rng = self.rng
        for a in range(n):
            acct, ip = f"{name}{a}", rng.choice(ips) + str(rng.randrange(1, 255))
            t, created = START + rng.uniform(0, 7200), START - rng.uniform(0, 3) * 86400
            for _ in range(200):
                q = rng.choice(self.maths)
                if rng.random() < blend:
                    text = rng.choice(self.user)
                elif paraphrase:
                    text = f"{rng.choice(PARA_PREFIX)} {q} {rng.choice(PARA_SUFFIX)}"
                else:
                    text = template.format(q=q)
                self.emit(t, acct, f"campaign_{name}", created, [{"role": "user", "content": text}], ip,
                          **extra)
                t += rng.uniform(*gap)


def build_events(seed: int, scale: float, campaigns: bool) -> list[Event]:
    b = Builder(seed)
    b.ordinary(round(400 * scale))
    b.heavy(scale)
    if campaigns:
        b.campaign("templated", round(50 * scale), [f"52.1.{i}." for i in range(5)], (20, 40), 0.1, False,
                   COT_TEMPLATES[0], max_tokens=16384)
        b.campaign("paraphrased", round(50 * scale), [f"100.{64 + i}.250." for i in range(10)], (30, 60), 0.2,
                   True, "")
        b.campaign("slow", round(30 * scale), [f"52.2.{i}." for i in range(3)], (360, 600), 0.3, False,
                   COT_TEMPLATES[1])
    return sorted(b.events, key=lambda e: e.t)


class SimClock:
    """Virtual time, per request (a context variable set by the identity stage)."""

    def __init__(self) -> None:
        self.var: contextvars.ContextVar[float] = contextvars.ContextVar("sim_time", default=START)

    def __call__(self) -> float:
        return self.var.get()


class TimedRisk:
    def __init__(self, stage: RiskStage) -> None:
        self.stage = stage
        self.samples: list[float] = []
        self.scores: dict[str, float] = defaultdict(float)

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        start = time.perf_counter_ns()
        await self.stage(ctx)
        self.samples.append((time.perf_counter_ns() - start) / 1000.0)
        account = ctx.principal.account or ""
        self.scores[account] = max(self.scores[account], ctx.risk.score)
        return None


def sim_identity(clock: SimClock) -> Any:
    async def stage(ctx: RequestContext) -> Decision | None:
        h = ctx.request.headers
        clock.var.set(float(h["x-sim-time"]))
        ctx.wall_time = float(h["x-sim-time"])
        p = ctx.principal
        p.authenticated, p.account, p.tier = True, h["x-sim-account"], h.get("x-sim-tier", "free")
        p.org = h.get("x-sim-org") or None
        p.created_at = float(h["x-sim-created"])
        return None

    return stage


class SlowStore:
    """A memory signal store behind a round trip of ``latency`` seconds."""

    def __init__(self, inner: MemorySignalStore, latency: float) -> None:
        self.inner, self.latency = inner, latency

    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        return await self.inner.batch(ops)

    async def close(self) -> None:
        await self.inner.close()


async def run_phase(events: list[Event], threshold: float | None, concurrency: int,
                    store_mode: str = "memory", latency: float = 0.0) -> dict[str, Any]:
    clock = SimClock()
    signals: SignalStore = MemorySignalStore(clock)
    if store_mode == "behind":
        signals = BehindSignalStore(SlowStore(MemorySignalStore(clock), latency), clock=clock, coalesce=False)
    risk = TimedRisk(RiskStage(RiskSettings(), signals))
    stages: list[Any] = [sim_identity(clock), ClientIpStage(CidrSet.parse(["127.0.0.1/32"])),
                         GeoStage(StaticGeoProvider(geo_table())), risk]
    if threshold is not None:
        snapshot, issues = compile_sources([Source("sim.yaml", POLICY.format(threshold=threshold))])
        assert snapshot is not None, issues
        compiled: Snapshot = snapshot

        class Holder:
            current = compiled

        stages += [MatchStage(Holder()), FrictionStage(signals, MemoryStore(clock),
                                                       ChallengeSettings(secret=b"sim" * 8), clock)]
    served: dict[str, int] = defaultdict(int)
    first_friction: dict[str, int] = {}
    attempts: dict[str, int] = defaultdict(int)
    async with serve_mock(MockOptions(chunks=4)) as mock:
        settings = parse_settings(
            f"listen: {{host: 127.0.0.1, port: 0}}\nadmin: {{enabled: false}}\nupstreams:\n"
            f"  - name: mock\n    base_url: {mock.url}\nlogging: {{access_log: null, audit_log: null}}\n",
            "sim.yaml")
        app = create_app(settings, stages=stages)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
        queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=concurrency * 2)

        async def worker(session: aiohttp.ClientSession) -> None:
            while (ev := await queue.get()) is not None:
                async with session.post(url, json=ev.body, headers=ev.headers) as resp:
                    await resp.read()
                    n = attempts[ev.account] = attempts[ev.account] + 1
                    if resp.status == 200:
                        served[ev.account] += 1
                    elif ev.account not in first_friction:
                        first_friction[ev.account] = n

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
            for ev in events:
                await queue.put(ev)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        if isinstance(signals, BehindSignalStore):
            await signals.drain()
        await runner.cleanup()
    return {"served": served, "attempts": attempts, "first": first_friction, "scores": risk.scores,
            "risk_us": risk.samples,
            "store": (signals.status() if isinstance(signals, BehindSignalStore) else {"mode": "memory"})}


def report(events: list[Event], phase: dict[str, Any], threshold: float) -> dict[str, Any]:
    kinds = {ev.account: ev.population for ev in events}
    flagged = set(phase["first"])
    out: dict[str, Any] = {"threshold": threshold, "populations": {}}
    campaign_accounts = {a for a, k in kinds.items() if k.startswith("campaign")}
    tp = len(flagged & campaign_accounts)
    out["precision"] = tp / len(flagged) if flagged else 1.0
    out["recall"] = tp / len(campaign_accounts) if campaign_accounts else 1.0
    for pop in sorted(set(kinds.values())):
        accounts = [a for a, k in kinds.items() if k == pop]
        hit = [a for a in accounts if a in flagged]
        attempted = sum(phase["attempts"][a] for a in accounts)
        served = sum(phase["served"][a] for a in accounts)
        firsts = [phase["first"][a] - 1 for a in hit]
        out["populations"][pop] = {
            "accounts": len(accounts), "flagged": len(hit), "flagged_share": len(hit) / len(accounts),
            "within_200": sum(1 for f in firsts if f < 200) / len(accounts),
            "served_before_friction_median": statistics.median(firsts) if firsts else None,
            "requests": attempted, "served": served,
            "throughput_loss": 1 - served / attempted if attempted else 0.0,
            "max_score_median": statistics.median(phase["scores"][a] for a in accounts),
            "max_score_max": max(phase["scores"][a] for a in accounts),
        }
    out["signal_store"] = phase["store"]
    samples = sorted(phase["risk_us"])
    out["risk_stage_us"] = {"p50": statistics.median(samples), "p99": samples[int(len(samples) * 0.99)]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="distillation-defence simulator")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--margin", type=float, default=0.1,
                        help="threshold = highest benign account score + margin (fixed before attack runs)")
    parser.add_argument("--store", choices=("memory", "behind"), default="memory",
                        help="signal store: memory, or the write-behind mirror over it (as with Redis)")
    parser.add_argument("--store-latency", type=float, default=0.0005,
                        help="seconds per store call with --store behind (default 0.5 ms)")
    parser.add_argument("--json")
    args = parser.parse_args()
    benign = build_events(args.seed, args.scale, campaigns=False)
    full = build_events(args.seed, args.scale, campaigns=True)
    t0 = time.perf_counter()
    calib = asyncio.run(run_phase(benign, None, args.concurrency, args.store, args.store_latency))
    threshold = round(min(0.99, max(calib["scores"].values()) + args.margin), 3)
    result = asyncio.run(run_phase(full, threshold, args.concurrency, args.store, args.store_latency))
    out = report(full, result, threshold)
    out["benign_max_score"] = max(calib["scores"].values())
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))


if __name__ == "__main__":
    main()
