"""Cost of the risk stage per request (target: p50 <= 50 µs, p99 <= 150 µs with the memory store).

    .venv/bin/python bench/risk_stage.py [--requests 20000] [--redis redis://127.0.0.1:6379/0] [--gc server]
        [--loop uvloop] [--unique] [--cluster] [--no-lean]

Requests mix ordinary prompts (../shared/prompts/user-oriented-instructions.jsonl when present)
and chain-of-thought-wrapped GSM8K questions over 2,000 accounts and 500 addresses; each is timed
alone (``perf_counter_ns`` around one ``await stage(ctx)``), after a warm-up. ``gateway_cpu_us`` is
this process's CPU time per request (with Redis: the client side, without the server's script).
``--gc server`` collects and freezes the warmed-up state and sets the collector's thresholds as
``gateway/server.py`` does; by default the interpreter's own thresholds apply, whose full
collections over the benchmark's 20k live contexts and signal state add to the p99.
With Redis, ``--redis-mode`` picks the signal store's mode (``gateway/risk/behind.py``): ``inline``
awaits one ``EVALSHA`` per request; ``behind`` (the gateway's default) answers accounts already
mirrored locally and sends the writes behind, so the stage's time excludes the round trip while
``gateway_cpu_us`` still counts the client side of every write (the queue is drained inside the
measured window). Between requests the benchmark yields to the event loop once, outside the
timed span, so queued writes and replies are handled as they would be between requests.
``--loop uvloop`` runs on uvloop, as ``gateway run`` does (default: asyncio's own loop, which
the recorded figures used); with Redis it changes the client's I/O cost, not the stage's work.
The prompt pool repeats (about 1,600 texts), so most requests hit the stage's per-prompt memo;
``--unique`` makes every text new (user prompts get a numbered first sentence, GSM8K questions a
numbered suffix inside the one template), the cost of traffic that never repeats a prompt.
``--cluster`` takes ``--redis`` as a Redis Cluster's startup nodes (comma-separated URLs);
``--no-lean`` sends every script call through redis-py, as the store did for a Cluster before
its lean routes (``gateway/store/cluster.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import random
import statistics
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gateway.context import ApiFamily, Principal, RequestContext, RequestView
from gateway.risk.settings import RiskSettings
from gateway.risk.sigstore import MemorySignalStore, SignalStore
from gateway.stages.risk import RiskStage

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "prompts"
TEMPLATE = "Solve the following problem. {q} Let's think step by step and show your work."


def _prompts() -> tuple[list[str], list[str]]:
    users = ["Write a short poem about the sea.", "Summarise this paragraph for a child: the moon is far."]
    maths = ["A farmer has 12 cows and buys 7 more. How many cows are there?"]
    user_file, maths_file = PROMPTS / "user-oriented-instructions.jsonl", PROMPTS / "gsm8k-test.jsonl"
    if user_file.exists():
        users = []
        for line in user_file.read_text().splitlines():
            item = json.loads(line)
            inst = item["instances"][0]["input"] if item.get("instances") else ""
            users.append(f"{item['instruction']}\n{inst}".strip())
    if maths_file.exists():
        maths = [json.loads(line)["question"] for line in maths_file.read_text().splitlines()]
    return users, maths


def _ctx(rng: random.Random, users: list[str], maths: list[str], unique: int | None = None) -> RequestContext:
    if rng.random() < 0.5:
        text = rng.choice(users)
        if unique is not None:  # a different first sentence: nothing about this prompt is cached
            text = f"Request {unique} of today. {text}"
    else:
        question = rng.choice(maths)
        # unique: a new question inside the one template (a harvesting campaign)
        text = TEMPLATE.format(q=f"{question} (Variant {unique}.)" if unique is not None else question)
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 512}
    view = RequestView(api=ApiFamily.OPENAI, route="chat.completions", path="/v1/chat/completions",
                       method="POST", headers={}, body=body, model="m", max_tokens=512)
    ctx = RequestContext(request_id="r", request=view)
    ctx.principal = Principal(authenticated=True, account=f"acct{rng.randrange(2000)}", tier="free",
                              created_at=time.time() - rng.uniform(0, 30) * 86400)
    host = f"10.{rng.randrange(4)}.{rng.randrange(125)}.{rng.randrange(1, 250)}"
    ctx.client.ip = ipaddress.ip_address(host)
    ctx.client.asn = 64500 + rng.randrange(20)
    return ctx


async def run(requests: int, store: SignalStore, server_gc: bool = False,
              unique: bool = False, concurrency: int = 1) -> dict[str, float]:
    from gateway.risk.behind import BehindSignalStore

    users, maths = _prompts()
    rng = random.Random(7)
    stage = RiskStage(RiskSettings(), store)
    contexts = [_ctx(rng, users, maths, i if unique else None) for i in range(requests + 2000)]
    for ctx in contexts[:2000]:  # warm-up: fills account and network state
        await stage(ctx)
        await asyncio.sleep(0)
    if server_gc:  # what gateway/server.py does once started
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
    samples: list[float] = []
    cpu = time.process_time()  # this process only: with Redis, the server's time is not in it
    behind = store if isinstance(store, BehindSignalStore) else None
    local_before = behind.local_batches if behind is not None else 0

    async def worker(share: list[RequestContext]) -> None:
        for ctx in share:
            start = time.perf_counter_ns()
            await stage(ctx)
            samples.append((time.perf_counter_ns() - start) / 1000.0)
            await asyncio.sleep(0)  # between requests: queued writes go out, replies come in

    measured = contexts[2000:]
    await asyncio.gather(*(worker(measured[i::concurrency]) for i in range(concurrency)))
    if behind is not None:
        await behind.drain()
    cpu = time.process_time() - cpu
    samples.sort()
    return {"p50_us": statistics.median(samples), "p90_us": samples[int(len(samples) * 0.9)],
            "p99_us": samples[int(len(samples) * 0.99)], "mean_us": statistics.fmean(samples),
            "gateway_cpu_us": cpu / requests * 1e6,
            **({"local_share": (behind.local_batches - local_before) / requests}
               if behind is not None else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--redis", help="also measure with a RedisSignalStore at this URL")
    parser.add_argument("--gc", choices=("default", "server"), default="default",
                        help="garbage collector settings: the interpreter's, or the gateway server's")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop: asyncio's default, or uvloop as the gateway server runs")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight (tasks); above 1 a stage's time includes waiting for "
                             "the loop, and behind-mode writes of concurrent requests share a call")
    parser.add_argument("--redis-mode", choices=("inline", "behind", "both"), default="both",
                        help="signal store mode with --redis (default: both, one after the other)")
    parser.add_argument("--cluster", action="store_true",
                        help="--redis is a Redis Cluster: comma-separated startup node URLs")
    parser.add_argument("--no-lean", action="store_true",
                        help="send every script call through redis-py (the store's lean=False)")
    parser.add_argument("--unique", action="store_true",
                        help="make every prompt text unique (no prompt is seen twice: the cost without "
                             "the per-prompt memo's hits)")
    args = parser.parse_args()
    server_gc = args.gc == "server"

    def run_loop(coro: Coroutine[Any, Any, dict[str, float]]) -> dict[str, float]:
        if args.loop == "uvloop":
            import uvloop

            return uvloop.run(coro)
        return asyncio.run(coro)

    memory = run_loop(run(args.requests, MemorySignalStore(), server_gc, args.unique, args.concurrency))
    print("memory:", {k: round(v, 1) for k, v in memory.items()})
    if args.redis:
        from gateway.risk.behind import BehindSignalStore
        from gateway.risk.redis_sigstore import RedisSignalStore

        async def with_redis(mode: str) -> dict[str, float]:
            urls = args.redis.split(",") if args.cluster else args.redis
            redis = RedisSignalStore.from_url(urls, cluster=args.cluster, deadline=1.0,
                                              prefix=f"bench:{mode}:", lean=not args.no_lean)
            store: SignalStore = BehindSignalStore(redis) if mode == "behind" else redis
            try:
                return await run(args.requests, store, server_gc, args.unique, args.concurrency)
            finally:
                await store.close()

        modes = ("inline", "behind") if args.redis_mode == "both" else (args.redis_mode,)
        for mode in modes:
            print(f"redis {mode}:", {k: round(v, 2 if k == "local_share" else 1)
                                     for k, v in run_loop(with_redis(mode)).items()})


if __name__ == "__main__":
    main()
