"""Cost of the quota stage per request, with MemoryStore and with a real Redis on loopback.

    .venv/bin/python bench/quota_stage.py [--requests 20000] [--no-redis] [--redis-calls 5000]
                                          [--concurrency 16] [--api openai|anthropic]
                                          [--leases-held 1000] [--accounts 2000] [--cluster]

For 1 limit (requests per account) and 3 limits (the bench policy: requests per account,
total tokens per org, requests per client /24), each request is timed alone: ``await stage(ctx)``
(plan, one store charge, headers) and ``await stage.settle(ctx)`` (reconcile the token
reservation with the reported usage, which differs from it, so a token limit needs a reconcile).
Wall time per call is ``perf_counter_ns``; CPU is ``process_time_ns`` of this process over the
whole measured loop divided by the requests, so for Redis it excludes redis-server's own work
and the loopback wait. Contexts draw at random from ``--accounts`` (2,000) accounts, a tenth as
many orgs and a quarter as many client /24s (at least 500). The stage and the Redis store memoise
per key, 16,384 keys per limit: ``--accounts 100000`` makes nearly every request miss (many
accounts, the distillation traffic shape), the default makes them hit.

A concurrent run (``--concurrency`` tasks, 3 limits, charge + settle request after request) is
closer to the gateway under load: round trips overlap, commands share writes on the lean
connection and reconciles are batched. It compares MemoryStore, RedisStore (lean connection,
deferred reconciles; the mean batch size is shown) and RedisStore on redis-py (``lean=False``);
``--cluster`` adds both on a 3-primary Redis Cluster (started with ``redis-cli --cluster create``
on free ports), with 1 and 3 limits.

A last run times one concurrency limit on MemoryStore, a charge and its release, with no lease
and with ``--leases-held`` (1,000) other leases held: counting the live leases must not grow with
them.

With Redis a ``redis-server`` is started on a free port (persistence off) and killed at the end;
a micro benchmark also reports the client CPU per sequential call (PING through redis-py, one
EVALSHA of the charge script through the lean connection and through redis-py), the floor under
every store round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from gateway.context import ApiFamily, Principal, RequestContext, RequestView
from gateway.policy.registry import MatchedAction
from gateway.quota.limits import CompiledLimit, LimitKind, QuotaAction, key_getter
from gateway.quota.settings import QuotaSettings
from gateway.quota.stage import QuotaStage
from gateway.store.base import Adjustment, Algorithm, Charge, Store
from gateway.store.memory import MemoryStore


@dataclass
class _Outcome:
    """Stands in for the policy outcome: the stage only reads ``.actions``."""

    actions: list[MatchedAction] = field(default_factory=list)


def _limit(name: str, kind: LimitKind, amount: int, per: float, key: str, burst: int = 1) -> CompiledLimit:
    getter = key_getter(key)
    assert getter is not None
    return CompiledLimit(name, kind, amount, per, burst, None, (key,), (getter,))


def _actions(limits: int) -> list[MatchedAction]:
    # Sized so the benchmark never hits them: the stage does all its work and denies nothing.
    every = [
        _limit("rpm", LimitKind.REQUESTS, 1_000_000_000, 60, "principal.account", burst=1_000_000),
        _limit("tpd", LimitKind.TOTAL_TOKENS, 1_000_000_000_000, 86400, "principal.org"),
        _limit("rpm-net", LimitKind.REQUESTS, 1_000_000_000, 60, "client.ip_prefix", burst=1_000_000),
    ]
    return [MatchedAction("bench-quota", "quota", QuotaAction(tuple(every[:limits])))]


def _contexts(count: int, actions: list[MatchedAction], seed: int = 7,
              api: ApiFamily = ApiFamily.OPENAI, accounts: int = 2000,
              networks: int = 500) -> list[RequestContext]:
    rng = random.Random(seed)
    out: list[RequestContext] = []
    route, path = (("messages", "/v1/messages") if api is ApiFamily.ANTHROPIC
                   else ("chat.completions", "/v1/chat/completions"))
    for i in range(count):
        view = RequestView(api=api, route=route, path=path,
                           method="POST", headers={}, model="gpt-4o-mini", max_tokens=64,
                           input_tokens_estimate=20)
        ctx = RequestContext(request_id=f"req-{i:08x}", request=view)
        acct = rng.randrange(accounts)
        ctx.principal = Principal(authenticated=True, account=f"acct{acct}",
                                  org=f"org{acct % max(1, accounts // 10)}")
        net = rng.randrange(max(networks, accounts // 4))
        ctx.client.ip = ipaddress.ip_address(f"10.{net // 125}.{net % 125}.{rng.randrange(1, 250)}")
        ctx.outcome = _Outcome(actions)
        out.append(ctx)
    return out


def _finish(ctx: RequestContext) -> None:
    """What the forwarder leaves behind: an upstream answer with usage unlike the reservation."""
    ctx.upstream_started = time.perf_counter()
    ctx.upstream_status = 200
    ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.complete = 18, 12, True


def _pct(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(len(samples) * q))]


async def measure(store: Store, limits: int, requests: int, warmup: int = 2000,
                  api: ApiFamily = ApiFamily.OPENAI, accounts: int = 2000) -> dict[str, float]:
    stage = QuotaStage(store, QuotaSettings())
    contexts = _contexts(requests + warmup, _actions(limits), api=api, accounts=accounts)
    for ctx in contexts[:warmup]:
        assert await stage(ctx) is None
        _finish(ctx)
        await stage.settle(ctx)
    charge: list[float] = []
    settle: list[float] = []
    cpu0 = time.process_time_ns()
    for ctx in contexts[warmup:]:
        t0 = time.perf_counter_ns()
        decision = await stage(ctx)
        t1 = time.perf_counter_ns()
        _finish(ctx)
        t2 = time.perf_counter_ns()
        await stage.settle(ctx)
        t3 = time.perf_counter_ns()
        assert decision is None
        charge.append((t1 - t0) / 1000.0)
        settle.append((t3 - t2) / 1000.0)
    cpu = (time.process_time_ns() - cpu0) / 1000.0 / requests
    total = sorted(c + s for c, s in zip(charge, settle, strict=True))
    charge.sort()
    settle.sort()
    return {"charge_p50": statistics.median(charge), "charge_p99": _pct(charge, 0.99),
            "settle_p50": statistics.median(settle), "settle_p99": _pct(settle, 0.99),
            "total_p50": statistics.median(total), "total_p99": _pct(total, 0.99), "cpu_mean": cpu}


async def measure_concurrent(store: Store, limits: int, requests: int, concurrency: int = 16,
                             warmup: int = 2000, api: ApiFamily = ApiFamily.OPENAI,
                             accounts: int = 2000, networks: int = 500) -> dict[str, float]:
    """Like the gateway under load: ``concurrency`` tasks, each charging and settling request
    after request, so round trips overlap, commands pipeline and reconciles batch."""
    stage = QuotaStage(store, QuotaSettings())
    contexts = _contexts(requests + warmup, _actions(limits), api=api, accounts=accounts, networks=networks)

    async def worker(share: list[RequestContext]) -> None:
        for ctx in share:
            assert await stage(ctx) is None
            _finish(ctx)
            await stage.settle(ctx)

    await asyncio.gather(*(worker(contexts[i:warmup:concurrency]) for i in range(concurrency)))
    measured = contexts[warmup:]
    cpu0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    await asyncio.gather(*(worker(measured[i::concurrency]) for i in range(concurrency)))
    wall = (time.perf_counter_ns() - t0) / 1e9
    cpu = (time.process_time_ns() - cpu0) / 1000.0 / requests
    return {"cpu_mean": cpu, "rps": requests / wall}


async def _per_call(fn: Callable[[], Awaitable[Any]], calls: int) -> tuple[float, float]:
    """(CPU µs, wall p50 µs) per sequential call."""
    for _ in range(200):
        await fn()
    walls: list[float] = []
    cpu0 = time.process_time_ns()
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await fn()
        walls.append((time.perf_counter_ns() - t0) / 1000.0)
    cpu = (time.process_time_ns() - cpu0) / 1000.0 / calls
    return cpu, statistics.median(walls)


async def redis_client_cost(url: str, calls: int) -> dict[str, tuple[float, float]]:
    """Client cost per sequential call: PING through redis-py, and one EVALSHA of charge.lua (one
    GCRA key) through RedisStore.charge on the lean connection and on redis-py."""
    from gateway.store.redis import RedisStore

    lean = RedisStore.from_url(url, deadline=1.0)
    plain = RedisStore.from_url(url, deadline=1.0, lean=False)
    try:
        charge = Charge("bench|probe", Algorithm.GCRA, 1_000_000_000, 60_000, 1, burst=1_000_000)
        return {"PING (redis-py)": await _per_call(lambda: lean.client.ping(), calls),
                "EVALSHA charge via RedisStore.charge, lean connection": await _per_call(
                    lambda: lean.charge([charge]), calls),
                "EVALSHA charge via RedisStore.charge, redis-py": await _per_call(
                    lambda: plain.charge([charge]), calls)}
    finally:
        await lean.close()
        await plain.close()


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, persistence off; ``wrapper`` runs it
    under another command (``bench/redis_scripts.py``: valgrind), which may take ``start_timeout``
    seconds to come up."""

    def __init__(self, wrapper: Sequence[str] = (), start_timeout: float = 10) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.dir = tempfile.mkdtemp(prefix="tg-bench-redis-")
        self.proc = subprocess.Popen(
            [*wrapper, "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


async def memory_leases_held(held: int, calls: int) -> float:
    """µs per charge + release of one concurrency limit on MemoryStore while ``held`` other
    leases are held (open streams): what counting the live leases costs as they grow."""
    now = [1_000.0]
    store = MemoryStore(lambda: now[0])
    for i in range(held):
        await store.charge([Charge("conc", Algorithm.LEASE, held + 10, 60_000, 1, lease_id=f"held{i}")])
    start = time.perf_counter()
    for i in range(calls):
        result = await store.charge([Charge("conc", Algorithm.LEASE, held + 10, 60_000, 1, lease_id=f"r{i}")])
        await store.adjust([Adjustment(result.receipts[0], -1)])
        now[0] += 0.0001
    return (time.perf_counter() - start) / calls * 1e6


def _row(store: str, limits: int, r: dict[str, float]) -> str:
    return (f"| {store} | {limits} | {r['charge_p50']:.1f} | {r['charge_p99']:.1f} | {r['settle_p50']:.1f} "
            f"| {r['settle_p99']:.1f} | {r['total_p50']:.1f} | {r['total_p99']:.1f} | {r['cpu_mean']:.1f} |")


async def _cluster_rows(args: argparse.Namespace, api: ApiFamily, accounts: int
                        ) -> list[tuple[str, dict[str, float]]]:
    """The concurrent run on a 3-primary Redis Cluster: the three limits' keys (account, org,
    /24) hash to different slots, so each request makes one script call per slot."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gateway.store.redis import RedisStore
    from tests.support.redis_servers import start_cluster

    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="tg-bench-cluster-")))
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        for limits in (1, 3):
            for name, lean in (("lean connections per primary", True), ("redis-py (lean=False)", False)):
                store = RedisStore.from_url(cluster.urls, cluster=True, deadline=1.0, lean=lean)
                try:
                    result = await measure_concurrent(store, limits, args.requests, args.concurrency,
                                                      api=api, accounts=accounts)
                finally:
                    await store.close()
                rows.append((f"Redis Cluster, {name}, {limits} limit{'s' if limits > 1 else ''}", result))
    finally:
        cluster.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--redis-calls", type=int, default=5000, help="calls in the redis-py micro benchmark")
    parser.add_argument("--no-redis", action="store_true", help="MemoryStore only")
    parser.add_argument("--concurrency", type=int, default=16, help="tasks in the concurrent run")
    parser.add_argument("--leases-held", type=int, default=1000,
                        help="leases held (open streams) in the MemoryStore concurrency-limit run")
    parser.add_argument("--api", choices=[a.value for a in ApiFamily], default=ApiFamily.OPENAI.value,
                        help="API family of the requests (picks the provider header aliases)")
    parser.add_argument("--accounts", type=int, default=2000,
                        help="accounts the requests come from (orgs: a tenth; /24s: a quarter, >= 500)")
    parser.add_argument("--cluster", action="store_true",
                        help="also run the concurrent rows on a 3-primary Redis Cluster (redis-cli needed)")
    args = parser.parse_args()
    if not 1 <= args.accounts <= 10_000_000:
        parser.error("--accounts must be in [1, 10000000]")
    api = ApiFamily(args.api)
    accounts = args.accounts
    use_redis = not args.no_redis and shutil.which("redis-server") is not None
    rows: list[str] = []
    client_cost: dict[str, tuple[float, float]] = {}
    concurrent: list[tuple[str, dict[str, float]]] = []
    leases: dict[int, float] = {}
    server = RedisServer() if use_redis else None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            for limits in (1, 3):
                result = runner.run(measure(MemoryStore(), limits, args.requests, api=api, accounts=accounts))
                rows.append(_row("memory", limits, result))
            if server is not None:
                from gateway.store.redis import RedisStore

                for limits in (1, 3):
                    store = RedisStore.from_url(server.url, deadline=1.0)
                    try:
                        result = runner.run(measure(store, limits, args.requests, api=api, accounts=accounts))
                    finally:
                        runner.run(store.close())
                    rows.append(_row("redis", limits, result))
                client_cost = runner.run(redis_client_cost(server.url, args.redis_calls))
            for held in (0, args.leases_held):
                leases[held] = runner.run(memory_leases_held(held, args.requests))
            concurrent.append(("memory", runner.run(measure_concurrent(
                MemoryStore(), 3, args.requests, args.concurrency, api=api, accounts=accounts))))
            if server is not None:
                for name, lean in (("redis, lean connection + batched reconciles", True),
                                   ("redis, redis-py (lean=False)", False)):
                    store = RedisStore.from_url(server.url, deadline=1.0, lean=lean)
                    try:
                        result = runner.run(measure_concurrent(store, 3, args.requests, args.concurrency,
                                                                    api=api, accounts=accounts))
                        queue = store.reconcile
                        if queue is not None and queue.batches:
                            name += f" (mean batch {queue.adjustments / queue.batches:.1f})"
                    finally:
                        runner.run(store.close())
                    concurrent.append((name, result))
            if args.cluster:
                concurrent += runner.run(_cluster_rows(args, api, accounts))
    finally:
        if server is not None:
            server.stop()
    print(f"Quota stage per request ({args.requests} requests from {accounts:,} accounts, {api.value} "
          f"routes, µs; CPU = process time / request; pid {os.getpid()})\n")
    print("| store | limits | charge p50 | charge p99 | settle p50 | settle p99 | total p50 | total p99 "
          "| CPU mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nConcurrent: {args.concurrency} tasks, 3 limits, charge + settle per request:\n")
    print("| store | CPU µs / request | requests/s |")
    print("|---|---:|---:|")
    for name, r in concurrent:
        print(f"| {name} | {r['cpu_mean']:.1f} | {r['rps']:,.0f} |")
    print("\nMemoryStore, one concurrency limit, charge + release while other leases are held:\n")
    print("| leases held | µs per charge + release |")
    print("|---:|---:|")
    for held, us in leases.items():
        print(f"| {held:,} | {us:.1f} |")
    if client_cost:
        try:
            import hiredis  # noqa: F401

            parser_name = "hiredis"
        except ImportError:
            parser_name = "pure-Python parser"
        print(f"\nRedis client per sequential call ({args.redis_calls} calls, {parser_name}):\n")
        print("| call | client CPU µs | wall p50 µs |")
        print("|---|---:|---:|")
        for name, (cpu, wall) in client_cost.items():
            print(f"| {name} | {cpu:.1f} | {wall:.1f} |")
    elif not args.no_redis:
        print("\n(redis-server not on PATH: Redis rows skipped)")


if __name__ == "__main__":
    main()
