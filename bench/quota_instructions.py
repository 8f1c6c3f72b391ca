"""Instructions per request of the quota stage, counted by callgrind: a figure that does not
move with this machine's noise, for comparing two trees or two versions of the stage.

    .venv/bin/python bench/quota_instructions.py [--requests 3000] [--keys same|random]
                                                 [--scenarios noop,memory-1,...,redis-3@ping]

Each scenario runs the stage as ``bench/quota_stage.py``'s concurrent run does (16 tasks, charge
then settle, request after request; the token reservation differs from the reported usage, so
the daily budget reconciles) in a child process under ``valgrind --tool=callgrind``, twice: with
1,000 requests and with 1,000 + ``--requests``. The difference in the process's instructions,
divided by ``--requests``, is the cost of one more request: start-up, imports and warm-up cancel
out. ``noop`` replaces the stage with one that does nothing, so its figure is the harness's own
(building a context, the task loop); the table subtracts it from the others. redis-server runs
outside valgrind (valgrind does not follow the child's children), so the Redis figures are the
gateway's side of each round trip: encoding, the lean connection, the reply, the event loop.

A scenario may name one of ``bench/quota_ablation.py``'s variants, ``redis-3@ping`` for example
(the stage reduced to one ``PING``), to see what each part of the stage costs in instructions.

``--keys same`` (the default) sends every request from one account and one client /24, like
``bench/load.py``'s default traffic, so the stage's memos always hit; ``--keys random`` draws
from 2,000 accounts and 500 /24s, so most combinations are new to the memos.

The limits are the bench policy's: ``-1`` requests per account; ``-3`` adds total tokens per org
(a one-day sliding window) and requests per client /24. Instruction counts are repeatable to
~1% for the same tree and Python (~3% for Redis: how replies batch depends on timing); they are
not CPU time (cache misses, system calls and the kernel are not in them), so a saving here is an
upper bound on the saving in µs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BASE_REQUESTS = 1000
WARMUP = 1500
SCENARIOS = ("noop", "memory-1", "memory-3", "redis-1", "redis-3")
# bench/quota_ablation.py's variants, as ``SCENARIO@VARIANT`` (``ping`` needs a Redis scenario).
ABLATIONS = ("noop", "ping", "charge", "noheaders", "nosettle", "noreconcile", "full")


def _child(scenario: str, requests: int, keys: str) -> None:
    """Runs in the process under callgrind: one scenario, ``requests`` measured requests."""
    import quota_stage  # bench/quota_stage.py: its contexts, harness and throwaway redis-server
    import uvloop

    from gateway.quota.stage import QuotaStage
    from gateway.store.memory import MemoryStore
    from gateway.store.redis import RedisStore

    # One account on one /24 (every memo hits), or bench/quota_stage.py's spread of clients.
    accounts, networks = (1, 1) if keys == "same" else (2000, 500)

    scenario, _, ablation = scenario.partition("@")
    if ablation:  # the stage cut down as bench/quota_ablation.py does for the gateway
        import quota_ablation

        quota_ablation.VARIANTS[ablation]()
    store_kind, _, limits = scenario.partition("-")

    async def run() -> None:
        if store_kind == "noop":
            async def nothing(stage: QuotaStage, ctx: object) -> None:
                return None

            QuotaStage.__call__ = nothing  # type: ignore[method-assign,assignment]
            QuotaStage.settle_now = lambda stage, ctx: None  # type: ignore[method-assign,assignment]
        if store_kind != "redis":
            await quota_stage.measure_concurrent(MemoryStore(), int(limits or 3), requests, warmup=WARMUP,
                                                 accounts=accounts, networks=networks)
            return
        server = quota_stage.RedisServer()
        try:
            store = RedisStore.from_url(server.url, deadline=1.0)
            await quota_stage.measure_concurrent(store, int(limits), requests, warmup=WARMUP,
                                                 accounts=accounts, networks=networks)
            await store.close()
        finally:
            server.stop()

    uvloop.install()
    asyncio.run(run())


def _instructions(scenario: str, requests: int, keys: str, workdir: str) -> int:
    out = os.path.join(workdir, f"callgrind.{scenario}.{requests}")
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
         "--child", scenario, "--requests", str(requests), "--keys", keys],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONHASHSEED": "0"})
    for line in Path(out).read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def per_request(scenario: str, requests: int, keys: str, workdir: str) -> float:
    """Instructions of one more request in ``scenario`` (harness included)."""
    base = _instructions(scenario, BASE_REQUESTS, keys, workdir)
    more = _instructions(scenario, BASE_REQUESTS + requests, keys, workdir)
    return (more - base) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests beyond the base run")
    parser.add_argument("--keys", choices=("same", "random"), default="same")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--child", metavar="SCENARIO", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.requests, args.keys)
        return
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = {s for s in scenarios if s.partition("@")[0] not in SCENARIOS
               or (s.partition("@")[2] or "full") not in ABLATIONS or s.startswith("noop@")}
    if unknown:
        raise SystemExit(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}, "
                         f"optionally with @{'|'.join(ABLATIONS)} (not on noop)")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH: this benchmark counts instructions with callgrind")
    if "noop" not in scenarios:
        scenarios.insert(0, "noop")
    workdir = tempfile.mkdtemp(prefix="tg-bench-instructions-")
    try:
        figures = {s: per_request(s, args.requests, args.keys, workdir) for s in scenarios}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    harness = figures["noop"]
    print(f"Quota stage, instructions per request (callgrind; {args.requests:,} requests over a "
          f"{BASE_REQUESTS:,}-request base run; keys: {args.keys}; Python {sys.version.split()[0]})\n")
    print("| scenario | per request, harness included | the stage (minus noop) |")
    print("|---|---:|---:|")
    for scenario, total in figures.items():
        own = "–" if scenario == "noop" else f"{total - harness:,.0f}"
        print(f"| {scenario} | {total:,.0f} | {own} |")


if __name__ == "__main__":
    main()
