"""What the quota scripts cost Redis per call: instructions under callgrind, or CPU time.

    .venv/bin/python bench/redis_scripts.py [--calls 2000] [--cpu] [--calls-cpu 20000]

Redis runs ``charge.lua`` for every request and ``adjust.lua`` for every batch of reconciles, on
its one thread, for every gateway replica: its cost per call is what bounds how many requests
one Redis serves. The calls are made by the gateway's own ``RedisStore`` (so the arguments are
encoded exactly as in production), with the bench policy's three limits: requests per account
(GCRA), total tokens per org (a one-day sliding window) and requests per client /24 (GCRA).

Scenarios:

- ``charge, one request-rate limit``: requests per account alone (``bench/policies/rpm``);
- ``charge, young window``: the token window holds one bucket (a key created seconds ago, as in
  every short load run);
- ``charge, full window``: the token window holds 30 buckets, its steady state once a day of
  traffic has passed (written before the run, then recounted by the first call);
- ``adjust, window``: reconciles of the token window, four per ``adjust.lua`` call (per
  reconcile: the call's cost over four).

By default a ``redis-server`` runs under ``valgrind --tool=callgrind`` and each scenario reports
instructions per call (counters zeroed after a warm-up, dumped after the measured calls), which
do not depend on what else the machine is doing. ``--cpu`` also runs the scenarios on a plain
``redis-server`` and reports its utime + stime per call from ``/proc`` (pipelined 16 deep, so
the system calls are shared as under load).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quota_stage import RedisServer  # noqa: E402

from gateway.store.base import Adjustment, Algorithm, Charge, Receipt  # noqa: E402
from gateway.store.redis import RedisStore  # noqa: E402

DAY_MS = 86_400_000
TOKENS = 300  # a request's token reservation


class Server(RedisServer):
    """The benchmark's redis-server, optionally under callgrind."""

    def __init__(self, callgrind: bool) -> None:
        self.out = os.path.join(tempfile.mkdtemp(prefix="tg-bench-callgrind-"), "callgrind.out")
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}"] if callgrind else []
        super().__init__(wrapper, start_timeout=60)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def instructions(self, run: Callable[[], None]) -> int:
        """Instructions redis-server executed while ``run()`` ran (callgrind dump difference)."""
        subprocess.run(["callgrind_control", "-z", str(self.proc.pid)], check=True, capture_output=True)
        run()
        subprocess.run(["callgrind_control", "-d", str(self.proc.pid)], check=True, capture_output=True)
        dump = max(glob.glob(self.out + ".*"), key=os.path.getmtime)
        text = subprocess.run(["callgrind_annotate", dump], check=True, capture_output=True, text=True).stdout
        match = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", text)
        if match is None:
            raise RuntimeError(f"no total in {dump}")
        return int(match.group(1).replace(",", ""))

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(os.path.dirname(self.out), ignore_errors=True)


def charges(i: int) -> list[Charge]:
    """The bench policy's three limits for request ``i`` (200 accounts, 50 networks, one org)."""
    return [
        Charge(f"q|bench|rpm|requests|account=acct{i % 200}", Algorithm.GCRA, 10**9, 60_000, 1, 10**6),
        Charge("q|bench|tpd|total_tokens|org=org1", Algorithm.WINDOW, 10**12, DAY_MS, TOKENS),
        Charge(f"q|bench|rpm-net|requests|ip_prefix=10.0.{i % 50}.0/24", Algorithm.GCRA, 10**9, 60_000, 1,
               10**6),
    ]


async def fill_window(store: RedisStore) -> None:
    """30 live buckets in the token window, as a day of traffic leaves it."""
    window = charges(0)[1]
    seconds, micros = await store.client.time()
    now = seconds * 1000 + micros // 1000
    gran = window.bucket_ms
    newest = now - now % gran
    key = store.key(window.key)
    await store.client.delete(key)
    await store.client.hset(key, mapping={str(newest - k * gran): 1000 for k in range(30)})
    await store.client.pexpire(key, 2 * DAY_MS)
    await store.charge(charges(0))  # the first call writes the running total


def charge_calls(limits: int) -> Callable[[RedisStore, int], Awaitable[None]]:
    """``calls`` charges of the first ``limits`` of the bench policy's limits, 16 in flight."""
    async def drive(store: RedisStore, calls: int) -> None:
        depth = 16
        for start in range(0, calls, depth):
            await asyncio.gather(*(store.charge(charges(i)[:limits])
                                   for i in range(start, min(calls, start + depth))))
    return drive


async def adjust_calls(store: RedisStore, calls: int, receipts: list[Receipt]) -> None:
    """``calls`` adjust.lua calls of four reconciles each (+7 and -7: the buckets stay put)."""
    def batch(i: int) -> list[Adjustment]:
        return [Adjustment(receipts[(i * 4 + k) % len(receipts)], -7 if k % 2 else 7) for k in range(4)]

    depth = 16
    for start in range(0, calls, depth):
        await asyncio.gather(*(store.adjust(batch(i)) for i in range(start, min(calls, start + depth))))


Prepare = Callable[[RedisStore], Awaitable[None]]
Drive = Callable[[RedisStore, int], Awaitable[None]]
Scenario = tuple[str, Prepare, Drive, int]  # name, setup, calls, reconciles per call


def scenarios() -> list[Scenario]:
    receipts: list[Receipt] = []

    async def fresh(store: RedisStore) -> None:
        await store.client.flushall()

    async def full(store: RedisStore) -> None:
        await store.client.flushall()
        await fill_window(store)

    async def reserve(store: RedisStore) -> None:
        await store.client.flushall()
        receipts.clear()
        for i in range(64):
            receipts.append((await store.charge(charges(i))).receipts[1])

    async def adjust(store: RedisStore, calls: int) -> None:
        await adjust_calls(store, calls, receipts)

    return [
        ("charge.lua, one request-rate limit", fresh, charge_calls(1), 1),
        ("charge.lua, young window", fresh, charge_calls(3), 1),
        ("charge.lua, full window (30 buckets)", full, charge_calls(3), 1),
        ("adjust.lua, per window reconcile", reserve, adjust, 4),
    ]


def run_callgrind(calls: int) -> dict[str, float]:
    server = Server(callgrind=True)
    results: dict[str, float] = {}
    loop = asyncio.new_event_loop()
    try:
        for name, prepare, drive, per_call in scenarios():
            store = RedisStore.from_url(server.url, deadline=30.0)
            loop.run_until_complete(prepare(store))
            loop.run_until_complete(drive(store, 200))  # warm-up: scripts loaded, keys created
            ir = server.instructions(lambda: loop.run_until_complete(drive(store, calls)))  # noqa: B023 (runs at once)
            loop.run_until_complete(store.close())
            results[name] = ir / calls / per_call
    finally:
        loop.close()
        server.stop()
    return results


def run_cpu(calls: int) -> dict[str, float]:
    server = Server(callgrind=False)
    results: dict[str, float] = {}

    async def measure(prepare: Prepare, drive: Drive) -> float:
        store = RedisStore.from_url(server.url, deadline=5.0)
        try:
            await prepare(store)
            await drive(store, 1000)
            before = server.cpu_seconds()
            await drive(store, calls)
            return server.cpu_seconds() - before
        finally:
            await store.close()

    try:
        for name, prepare, drive, per_call in scenarios():
            results[name] = asyncio.run(measure(prepare, drive)) / calls / per_call * 1e6
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per scenario under callgrind")
    parser.add_argument("--cpu", action="store_true", help="also measure CPU time on a plain redis-server")
    parser.add_argument("--calls-cpu", type=int, default=20000, help="measured calls per scenario for --cpu")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not on PATH")
    have_valgrind = shutil.which("valgrind") is not None
    ir = run_callgrind(args.calls) if have_valgrind else {}
    cpu = run_cpu(args.calls_cpu) if args.cpu else {}
    print("| scenario | redis-server instructions per call | redis-server CPU µs per call |")
    print("| --- | ---: | ---: |")
    for name, *_ in scenarios():
        k = f"{ir[name] / 1000:,.0f} k" if name in ir else "–"
        us = f"{cpu[name]:.1f}" if name in cpu else "–"
        print(f"| {name} | {k} | {us} |")
    if not have_valgrind:
        print("\n(valgrind not on PATH: no instruction counts)")


if __name__ == "__main__":
    main()
