"""Core load benchmark: direct-to-upstream vs the minimal aiohttp pass-through vs the gateway.

One command starts the mock upstream, the pass-through and the gateway as subprocesses (all on
uvloop, all on 127.0.0.1), then for each target runs non-streamed and streamed chat completions
at each concurrency for a fixed duration and prints a markdown table:

    .venv/bin/python bench/load.py                       # full matrix, ~1 min
    .venv/bin/python bench/load.py --targets direct,passthrough --duration 2
    .venv/bin/python bench/load.py --slow-streams 1000   # matrix, then 1,000 slow streams
    .venv/bin/python bench/load.py --clients 20000       # requests from 20,000 keys and addresses

Figures: req/s, p50/p99 latency (request written -> last byte read), and server CPU µs per
request of the process under test (utime+stime from /proc/<pid>/stat, summed over its process
tree, read before/after the measured window). On a small box the load generator competes for
CPU with the servers, so req/s is noisy; CPU per request is the robust figure.

Load generator: this process itself, a raw asyncio ``Protocol`` HTTP/1.1 keep-alive client with
pre-encoded requests and a minimal response parser (Content-Length or chunked). It costs a few
µs per request, far less than aiohttp's client; more loadgen processes would only steal CPU from
the servers on a 2-core machine. ``--pin`` pins the process under test to the last CPU and
everything else to the others.

By default every request carries the one bench key from one address, so every per-key memo of the
gateway always hits. ``--clients N`` spreads the requests round-robin over N clients instead,
each its own key (account; orgs of ten accounts) and its own /24 (sent in ``X-Forwarded-For``
from a trusted loopback proxy, inside 127.0.0.0/8 so the region rules still admit it): the
key cardinality of a provider's real traffic, and of distillation traffic above all.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadkit import (  # noqa: E402
    PY,
    ROOT,
    Conn,
    Target,
    connect,
    cpu_seconds,
    free_port,
    ready,
    request_bytes,
    rss_kib,
    spawn,
)

sys.path.insert(0, str(ROOT))
from tests.support.redis_servers import RedisClusterServers, start_cluster  # noqa: E402


# -- measurements ------------------------------------------------------------------------------
@dataclass
class Cell:
    target: str
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # process under test, per request
    mock_cpu_us: float
    latencies: list[float] = field(default_factory=list, repr=False)  # seconds; pooled over rounds
    store_cpu_us: float | None = None  # redis-server, per request, for targets that use it


async def _drive(conns: list[Conn], payloads: list[bytes], until: float, lat: list[float] | None) -> int:
    loop = asyncio.get_running_loop()
    errors = 0
    turn = itertools.cycle(payloads)

    async def one(conn: Conn) -> None:
        nonlocal errors
        clock = time.perf_counter
        while loop.time() < until:
            t = clock()
            status, _ = await conn.request(next(turn))
            if lat is not None:
                lat.append(clock() - t)
            if status != 200:
                errors += 1

    await asyncio.gather(*(one(c) for c in conns))
    return errors


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def run_cell(t: Target, mock_pid: int, stream: bool, conc: int, args: argparse.Namespace,
                   store_pids: tuple[int, ...] = ()) -> Cell:
    payloads = [request_bytes(t.port, stream, {"x-mock-chunks": str(args.chunks), **client})
                for client in client_headers(args.clients)]
    conns = [await connect(t.port) for _ in range(conc)]
    loop = asyncio.get_running_loop()
    try:
        await _drive(conns, payloads, loop.time() + args.warmup, None)
        lat: list[float] = []
        scpu0 = sum(cpu_seconds(pid) for pid in store_pids)
        cpu0, mcpu0, t0 = cpu_seconds(t.pid), cpu_seconds(mock_pid), time.perf_counter()
        errors = await _drive(conns, payloads, loop.time() + args.duration, lat)
        elapsed = time.perf_counter() - t0
        cpu1, mcpu1 = cpu_seconds(t.pid), cpu_seconds(mock_pid)
        scpu1 = sum(cpu_seconds(pid) for pid in store_pids)
    finally:
        for c in conns:
            c.close()
    n = max(len(lat), 1)
    return Cell(
        target=t.name,
        mode="stream" if stream else "json",
        concurrency=conc,
        requests=len(lat),
        errors=errors,
        seconds=round(elapsed, 2),
        rps=len(lat) / elapsed,
        p50_ms=_pct(lat, 0.5),
        p99_ms=_pct(lat, 0.99),
        cpu_us=(cpu1 - cpu0) / n * 1e6,
        mock_cpu_us=(mcpu1 - mcpu0) / n * 1e6,
        latencies=lat,
        store_cpu_us=(scpu1 - scpu0) / n * 1e6 if store_pids else None,
    )


def pooled(parts: list[Cell]) -> Cell:
    """One cell from its interleaved rounds: requests, time and CPU summed, latencies pooled."""
    first = parts[0]
    requests = sum(c.requests for c in parts)
    seconds = sum(c.seconds for c in parts)
    lat = [x for c in parts for x in c.latencies]
    n = max(requests, 1)
    return Cell(
        target=first.target, mode=first.mode, concurrency=first.concurrency, requests=requests,
        errors=sum(c.errors for c in parts), seconds=round(seconds, 2), rps=requests / seconds,
        p50_ms=_pct(lat, 0.5), p99_ms=_pct(lat, 0.99),
        cpu_us=sum(c.cpu_us * c.requests for c in parts) / n,
        mock_cpu_us=sum(c.mock_cpu_us * c.requests for c in parts) / n,
        store_cpu_us=(sum((c.store_cpu_us or 0.0) * c.requests for c in parts) / n
                      if first.store_cpu_us is not None else None),
    )


@dataclass
class SlowResult:
    target: str
    streams: int
    completed: int
    seconds: float
    rss_before_kib: int
    rss_peak_kib: int
    per_stream_kib: float


async def run_slow(t: Target, n: int, chunks: int) -> SlowResult:
    """Hold ``n`` streams open through the target, one 1-second chunk at a time."""
    payload = request_bytes(t.port, True, {"x-mock-chunks": str(chunks), "x-mock-chunk-delay-ms": "1000"})
    before = rss_kib(t.pid)
    conns: list[Conn] = []
    for start in range(0, n, 100):  # in batches: a burst of 1,000 SYNs can overflow a listen backlog
        conns.extend(await asyncio.gather(*(connect(t.port) for _ in range(min(100, n - start)))))
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(c.request(payload, want_first=True)) for c in conns]
    peak = before
    try:
        await asyncio.wait_for(asyncio.gather(*(c.first for c in conns if c.first is not None)), 60)
        # every stream is now open and idle between its 1 s chunks: sample RSS until they end
        while not all(task.done() for task in tasks) and time.perf_counter() - t0 < chunks + 60:
            peak = max(peak, rss_kib(t.pid))
            await asyncio.sleep(0.25)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    finally:
        for c in conns:
            c.close()
    completed = sum(1 for r in results if isinstance(r, tuple) and r == (200, True))
    return SlowResult(
        target=t.name,
        streams=n,
        completed=completed,
        seconds=round(time.perf_counter() - t0, 1),
        rss_before_kib=before,
        rss_peak_kib=peak,
        per_stream_kib=round((peak - before) / n, 1),
    )


# -- report ------------------------------------------------------------------------------------
def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "–"


def round_ratios(parts: dict[tuple[str, str, int], list[Cell]], baseline: str) -> list[str]:
    """Markdown rows: each target's req/s over the baseline's, per mode and concurrency, as the
    median (and range) of the per-round ratios. A round's cells ran back to back, so a slow spell
    of a shared machine touches both sides of its ratio; pooled req/s mixes spells instead.
    Beside it, the baseline's CPU per request over the target's, also per round: the throughput
    ratio of a deployment bound by the process under test's own CPU (its own cores, the model
    elsewhere), which moves less with the other processes sharing this machine."""
    rows: list[str] = []
    for (target, mode, conc), cells in parts.items():
        base = parts.get((baseline, mode, conc))
        if target == baseline or not base:
            continue
        pairs = list(zip(cells, base, strict=False))
        ratios = sorted(c.rps / b.rps for c, b in pairs if b.rps)
        cpu = sorted(b.cpu_us / c.cpu_us for c, b in pairs if c.cpu_us)
        if ratios and cpu:
            rows.append(f"| {target} | {mode} | {conc} | {statistics.median(ratios):.2f}x "
                        f"| {ratios[0]:.2f}–{ratios[-1]:.2f} | {statistics.median(cpu):.2f}x "
                        f"| {cpu[0]:.2f}–{cpu[-1]:.2f} | {len(ratios)} |")
    return rows


def render(cells: list[Cell], slow: list[SlowResult], args: argparse.Namespace,
           ratios: list[str] | None = None) -> str:
    by = {(c.target, c.mode, c.concurrency): c for c in cells}
    lines = [
        f"Chat completions ({args.chunks} content chunks per stream), {args.duration:g} s per cell"
        f"{f' in each of {args.rounds} interleaved rounds' if args.rounds > 1 else ''}, "
        f"{os.cpu_count()} CPUs{', pinned' if args.pin else ''}"
        f"{f', requests spread over {args.clients:,} keys and /24s' if args.clients > 1 else ''}. "
        "CPU = utime+stime per request of the "
        "process under test (for `direct`: the mock upstream itself).",
        "",
        "| target | mode | conc | req/s | p50 ms | p99 ms | CPU µs/req | req/s vs pass-through "
        "| req/s vs direct | CPU vs pass-through | +p50 vs direct ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        p = by.get(("passthrough", c.mode, c.concurrency))
        d = by.get(("direct", c.mode, c.concurrency))
        proxied = c.target != "direct"
        lines.append(
            f"| {c.target} | {c.mode} | {c.concurrency} | {c.rps:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} "
            f"| {c.cpu_us:,.0f} | {_ratio(c.rps, p.rps if p else None)} "
            f"| {_ratio(c.rps, d.rps if d else None)} "
            f"| {_ratio(c.cpu_us, p.cpu_us if p and proxied else None)} "
            f"| {f'{c.p50_ms - d.p50_ms:+.2f}' if d and proxied else '–'} | {c.errors} |"
        )
    stores = [c for c in cells if c.store_cpu_us is not None]
    if stores:
        lines += ["", "CPU of the redis-server(s) the Redis targets use, per request: " + "; ".join(
            f"{c.target} {c.mode} c={c.concurrency} {c.store_cpu_us:.0f} µs" for c in stores) + "."]
    if ratios:
        lines += [
            "",
            f"Throughput vs `{args.baseline}`, round by round (median of the per-round ratios); CPU-bound: "
            f"`{args.baseline}`'s CPU per request over the target's:",
            "",
            "| target | mode | conc | req/s ratio | range | CPU-bound ratio | range | rounds |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
            *ratios,
        ]
    if slow:
        lines += [
            "",
            f"Slow streams: {slow[0].streams} concurrent streams through the target, one chunk per "
            f"second ({args.slow_chunks} chunks each); RSS of the process under test.",
            "",
            "| target | streams | completed | seconds | RSS before MiB | RSS peak MiB "
            "| KiB per idle stream |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s in slow:
            lines.append(
                f"| {s.target} | {s.streams} | {s.completed} | {s.seconds} | {s.rss_before_kib / 1024:.1f} "
                f"| {s.rss_peak_kib / 1024:.1f} | {s.per_stream_kib:.1f} |"
            )
    return "\n".join(lines)


# -- clients -----------------------------------------------------------------------------------
BENCH_KEYS = "keys_file: bench-keys.yaml"


def _client_key(i: int) -> str:
    return f"tg_bench_client_{i:06d}"


def client_headers(clients: int) -> list[dict[str, str]]:
    """Per client: its key and address (one /24 each). One client: the bench key, no forwarding."""
    if clients == 1:
        return [{}]
    return [{"Authorization": f"Bearer {_client_key(i)}",
             "X-Forwarded-For": f"127.{(i >> 8) & 255}.{i & 255}.{1 + (i >> 16)}"} for i in range(clients)]


def _clients_keys_file(clients: int) -> Path:
    """bench/.rendered-keys-N.yaml: bench-keys.yaml (whose key the readiness probe uses) and N
    client keys (hashes only, like any keys file), orgs of ten."""
    path = ROOT / "bench" / f".rendered-keys-{clients}.yaml"
    lines = [(ROOT / "bench" / "bench-keys.yaml").read_text().rstrip("\n")]
    for i in range(clients):
        digest = hashlib.sha256(_client_key(i).encode()).hexdigest()
        lines += [f"  - id: key_client_{i}", f"    hash: sha256:{digest}", f"    account: bench-account-{i}",
                  f"    org: bench-org-{i // 10}", "    tier: pro", "    attributes: {org_country: US}"]
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:  # a rewrite would make running gateways reload it
        path.write_text(text)
    return path


# -- main --------------------------------------------------------------------------------------
def _config_source(name: str, default: str) -> Path:
    variant = name.partition(":")[2].partition("@")[0]
    return ROOT / "bench" / f"gateway-{variant}.yaml" if variant else Path(default)


def _gateway_config(name: str, default: str, redis_url: str | None, clients: int = 1,
                    cluster_urls: list[str] | None = None) -> str:
    """``gateway`` uses --config; ``gateway:VARIANT`` uses bench/gateway-VARIANT.yaml, with
    ``{redis_url}`` (or ``{cluster_nodes}``) filled in and, for ``--clients N``, the clients' keys
    file and the loopback as a trusted proxy (the rendered copy sits beside it, git-ignored)."""
    variant = name.partition(":")[2].partition("@")[0]
    source = _config_source(name, default)
    text = source.read_text()
    if "{redis_url}" not in text and "{cluster_nodes}" not in text and clients == 1:
        return str(source)
    if "{redis_url}" in text:
        if redis_url is None:
            raise SystemExit(f"{source.name} needs Redis but redis-server could not be started")
        text = text.replace("{redis_url}", redis_url)
    if "{cluster_nodes}" in text:
        if cluster_urls is None:
            raise SystemExit(f"{source.name} needs a Redis Cluster but it could not be started")
        text = text.replace("{cluster_nodes}", json.dumps(cluster_urls))
    if clients > 1:
        if BENCH_KEYS not in text or "client_ip:" in text:
            raise SystemExit(f"--clients: {source} must use {BENCH_KEYS!r} and set no client_ip")
        text = text.replace(BENCH_KEYS, f"keys_file: {_clients_keys_file(clients).name}")
        text += "client_ip: {trusted_proxies: [127.0.0.1/32]}  # load.py --clients\n"
    rendered = ROOT / "bench" / f".rendered-{variant or source.stem}.yaml"
    rendered.write_text(text)
    return str(rendered)


def _command(name: str, port: int, upstream: str, config: str) -> list[str] | None:
    if name == "passthrough":
        return [PY, "bench/passthrough.py", "--port", str(port), "--upstream", upstream]
    name, _, ablation = name.partition("@")
    if not name.startswith("gateway"):
        return None
    # gateway:VARIANT@PART: the quota stage cut down to PART (bench/quota_ablation.py)
    entry = ["bench/quota_ablation.py", ablation] if ablation else ["-m", "gateway"]
    return [PY, *entry, "run", "--config", config, "--port", str(port), "--upstream", upstream]


async def main(args: argparse.Namespace) -> int:
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    logs = ROOT / "bench" / "results"  # git-ignored
    logs.mkdir(parents=True, exist_ok=True)
    up = free_port()
    upstream = f"http://127.0.0.1:{up}"
    procs = {"mock": spawn([PY, "-m", "gateway.upstream.mock", "--port", str(up)], logs / "mock.log")}
    targets: list[Target] = []
    redis_url: str | None = None
    cluster: RedisClusterServers | None = None
    try:
        if not await ready(up, 15):
            print("mock upstream did not start; see bench/results/mock.log", file=sys.stderr)
            return 1
        mock_pid = procs["mock"].pid
        for name in names:
            if name == "direct":
                targets.append(Target("direct", up, mock_pid))
                continue
            port = free_port()
            if "redis" in name and redis_url is None:
                rport = free_port()
                procs["redis"] = spawn(["redis-server", "--port", str(rport), "--save", "", "--appendonly",
                                         "no"], logs / "redis.log")
                redis_url = f"redis://127.0.0.1:{rport}/0"
                await asyncio.sleep(0.3)
            if "{cluster_nodes}" in _config_source(name, args.config).read_text() and cluster is None:
                cluster = start_cluster(Path(tempfile.mkdtemp(prefix="tg-bench-cluster-")))
            cmd = _command(name, port, upstream, _gateway_config(
                name, args.config, redis_url, args.clients, cluster.urls if cluster else None))
            if cmd is None:
                print(f"unknown target {name!r}", file=sys.stderr)
                return 2
            procs[name] = spawn(cmd, logs / f"{name}.log")
            if await ready(port, 20):
                targets.append(Target(name, port, procs[name].pid))
            else:
                print(
                    f"warning: {name} did not answer; skipped (see bench/results/{name}.log)", file=sys.stderr
                )
        everyone = {p.pid for p in procs.values()} | {os.getpid()}
        cpus = sorted(os.sched_getaffinity(0))
        # Rounds interleave the targets cell by cell, so that a slow spell of a shared machine
        # falls on every target alike instead of on whichever ran at that moment.
        parts: dict[tuple[str, str, int], list[Cell]] = {}
        for _ in range(args.rounds):
            for mode in args.modes.split(","):
                for conc in (int(c) for c in args.concurrency.split(",")):
                    for t in targets:
                        if args.pin and len(cpus) > 1:
                            for pid in everyone - {t.pid}:
                                os.sched_setaffinity(pid, cpus[:-1])
                            os.sched_setaffinity(t.pid, cpus[-1:])
                        store: tuple[int, ...] = ()
                        if "redis" in t.name and "redis" in procs:
                            store = (procs["redis"].pid,)
                        elif "cluster" in t.name and cluster is not None:
                            store = tuple(node.proc.pid for node in cluster.nodes if node.proc is not None)
                        cell = await run_cell(t, mock_pid, mode == "stream", conc, args, store)
                        parts.setdefault((t.name, cell.mode, conc), []).append(cell)
                        print(
                            f"  {t.name:12} {cell.mode:6} c={conc:<3} {cell.rps:8.0f} req/s  "
                            f"p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  "
                            f"cpu {cell.cpu_us:5.0f} µs/req  err {cell.errors}"
                            + ("" if cell.store_cpu_us is None
                               else f"  redis-server {cell.store_cpu_us:.0f} µs/req"),
                            file=sys.stderr,
                        )
        order = {t.name: i for i, t in enumerate(targets)}
        cells = [pooled(p) for _, p in sorted(parts.items(), key=lambda kv: order[kv[0][0]])]
        slow: list[SlowResult] = []
        for t in targets if args.slow_streams else []:
            if t.name != "direct":
                slow.append(await run_slow(t, args.slow_streams, args.slow_chunks))
                print(f"  slow streams: {slow[-1]}", file=sys.stderr)
        ratios = round_ratios(parts, args.baseline) if args.baseline else None
        report = render(cells, slow, args, ratios)
        print(report)
        (logs / "latest.md").write_text(report + "\n")
        data = {"cells": [{k: v for k, v in asdict(c).items() if k != "latencies"} for c in cells],
                "slow": [asdict(s) for s in slow]}
        (logs / "latest.json").write_text(json.dumps(data, indent=1))
        failed = any(c.errors for c in cells) or any(s.completed != s.streams for s in slow)
        return 1 if failed else 0
    finally:
        if cluster is not None:
            cluster.stop()
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="direct,passthrough,gateway")
    ap.add_argument("--modes", default="json,stream", help="json (non-streamed) and/or stream")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell and round")
    ap.add_argument("--rounds", type=int, default=1,
                    help="interleaved rounds over the targets, pooled per cell (for a noisy machine)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell")
    ap.add_argument("--chunks", type=int, default=8, help="content chunks per streamed response")
    ap.add_argument("--config", default="bench/gateway-bench.yaml")
    ap.add_argument("--pin", action="store_true", help="pin the process under test to its own CPU")
    ap.add_argument("--clients", type=int, default=1, metavar="N",
                    help="spread requests over N keys and /24s (gateway targets; default: the one bench key)")
    ap.add_argument("--baseline", default="", metavar="TARGET",
                    help="also report each target's req/s over TARGET's, per round (median, range)")
    ap.add_argument("--slow-streams", type=int, default=0, metavar="N", help="also hold N slow streams")
    ap.add_argument("--slow-chunks", type=int, default=5, help="1-second chunks per slow stream")
    args = ap.parse_args(argv)
    if not 0 <= args.slow_streams <= 5000 or not 0 < args.duration <= 120 or not 1 <= args.rounds <= 20:
        ap.error("--slow-streams must be in [0, 5000], --duration in (0, 120], --rounds in [1, 20]")
    if not 1 <= args.clients <= 1_000_000:
        ap.error("--clients must be in [1, 1000000]")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    # 1,000 streams need ~3,000 descriptors across the processes; children inherit the raised limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    sys.exit(uvloop.run(main(arguments)))
