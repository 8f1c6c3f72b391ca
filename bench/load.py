"""Core load benchmark: direct-to-upstream vs the minimal aiohttp pass-through vs the gateway.

One command starts the mock upstream, the pass-through and the gateway as subprocesses (all on
uvloop, all on 127.0.0.1), then for each target runs non-streamed and streamed chat completions
at each concurrency for a fixed duration and prints a markdown table:

    .venv/bin/python bench/load.py                       # full matrix, ~1 min
    .venv/bin/python bench/load.py --targets direct,passthrough --duration 2
    .venv/bin/python bench/load.py --slow-streams 1000   # matrix, then 1,000 slow streams

Figures: req/s, p50/p99 latency (request written -> last byte read), and server CPU µs per
request of the process under test (utime+stime from /proc/<pid>/stat, summed over its process
tree, read before/after the measured window). On a small box the load generator competes for
CPU with the servers, so req/s is noisy; CPU per request is the robust figure.

Load generator: this process itself, a raw asyncio ``Protocol`` HTTP/1.1 keep-alive client with
pre-encoded requests and a minimal response parser (Content-Length or chunked). It costs a few
µs per request, far less than aiohttp's client; more loadgen processes would only steal CPU from
the servers on a 2-core machine. ``--pin`` pins the process under test to the last CPU and
everything else to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import uvloop

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PROMPT = "Say hello to the benchmark in a few words."
TICK = 1.0 / os.sysconf("SC_CLK_TCK")


# -- the raw client ----------------------------------------------------------------------------
class _Conn(asyncio.Protocol):
    """One keep-alive connection; ``request`` writes pre-encoded bytes and awaits the last byte."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[tuple[int, bool]] | None = None
        self.first: asyncio.Future[None] | None = None  # set when the first body bytes arrive
        self._reset()

    def _reset(self) -> None:
        self.buf.clear()
        self.status = 0
        self.body_start = -1
        self.length = -1  # -1: chunked, else Content-Length
        self.pos = 0  # chunked parse position

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.done, self.first):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection lost"))

    def _finish(self) -> None:
        assert self.done is not None
        self.done.set_result((self.status, b"[DONE]" in self.buf))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done is None or self.done.done():
            return
        if self.body_start < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            self.body_start = self.pos = end + 4
            at = head.find(b"\ncontent-length:")
            if at >= 0:
                eol = head.find(b"\r", at + 1)
                self.length = int(head[at + 16 : eol if eol > 0 else None])
            elif b"transfer-encoding: chunked" not in head:
                self.length = 0
        if self.first is not None and not self.first.done() and len(self.buf) > self.body_start:
            self.first.set_result(None)
        if self.length >= 0:
            if len(self.buf) >= self.body_start + self.length:
                self._finish()
            return
        while True:  # chunked: walk the complete chunks received so far
            eol = self.buf.find(b"\r\n", self.pos)
            if eol < 0:
                return
            size = int(self.buf[self.pos : eol].split(b";")[0], 16)
            if size == 0:
                if len(self.buf) >= eol + 4:
                    self._finish()
                return
            if len(self.buf) < eol + size + 4:
                return
            self.pos = eol + size + 4

    async def request(self, payload: bytes, want_first: bool = False) -> tuple[int, bool]:
        """Send one request; returns (status, saw ``[DONE]``)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._reset()
        self.done = loop.create_future()
        self.first = loop.create_future() if want_first else None
        self.transport.write(payload)
        return await self.done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _connect(port: int) -> _Conn:
    transport, conn = await asyncio.get_running_loop().create_connection(_Conn, "127.0.0.1", port)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _payload(port: int, stream: bool, extra: dict[str, str]) -> bytes:
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], "stream": stream}
    ).encode()
    headers = {
        "Host": f"127.0.0.1:{port}",
        "Content-Type": "application/json",
        "Authorization": os.environ.get("BENCH_AUTH", "Bearer tg_bench_key_0001"),  # bench/bench-keys.yaml
        "Content-Length": str(len(body)),
        **extra,
    }
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


# -- /proc accounting --------------------------------------------------------------------------
def _tree(pid: int) -> Iterator[int]:
    """``pid`` and its descendants (a gateway with --workers forks children)."""
    yield pid
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield from _tree(int(child))


def cpu_seconds(pid: int) -> float:
    ticks = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks * TICK


def rss_kib(pid: int) -> int:
    total = 0
    for p in _tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total


# -- processes ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    port: int
    pid: int  # the process whose CPU and memory are measured


async def _ready(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = await _connect(port)
            try:
                status, _ = await asyncio.wait_for(conn.request(_payload(port, False, {})), 5)
            finally:
                conn.close()
            if status == 200:
                return True
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    return False


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Output goes to a file: the gateway's access log costs here what it costs in production.
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


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


async def _drive(conns: list[_Conn], payload: bytes, until: float, lat: list[float] | None) -> int:
    loop = asyncio.get_running_loop()
    errors = 0

    async def one(conn: _Conn) -> None:
        nonlocal errors
        clock = time.perf_counter
        while loop.time() < until:
            t = clock()
            status, _ = await conn.request(payload)
            if lat is not None:
                lat.append(clock() - t)
            if status != 200:
                errors += 1

    await asyncio.gather(*(one(c) for c in conns))
    return errors


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


async def run_cell(t: Target, mock_pid: int, stream: bool, conc: int, args: argparse.Namespace) -> Cell:
    payload = _payload(t.port, stream, {"x-mock-chunks": str(args.chunks)})
    conns = [await _connect(t.port) for _ in range(conc)]
    loop = asyncio.get_running_loop()
    try:
        await _drive(conns, payload, loop.time() + args.warmup, None)
        lat: list[float] = []
        cpu0, mcpu0, t0 = cpu_seconds(t.pid), cpu_seconds(mock_pid), time.perf_counter()
        errors = await _drive(conns, payload, loop.time() + args.duration, lat)
        elapsed = time.perf_counter() - t0
        cpu1, mcpu1 = cpu_seconds(t.pid), cpu_seconds(mock_pid)
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
    payload = _payload(t.port, True, {"x-mock-chunks": str(chunks), "x-mock-chunk-delay-ms": "1000"})
    before = rss_kib(t.pid)
    conns: list[_Conn] = []
    for start in range(0, n, 100):  # in batches: a burst of 1,000 SYNs can overflow a listen backlog
        conns.extend(await asyncio.gather(*(_connect(t.port) for _ in range(min(100, n - start)))))
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


def render(cells: list[Cell], slow: list[SlowResult], args: argparse.Namespace) -> str:
    by = {(c.target, c.mode, c.concurrency): c for c in cells}
    lines = [
        f"Chat completions ({args.chunks} content chunks per stream), {args.duration:g} s per cell, "
        f"{os.cpu_count()} CPUs{', pinned' if args.pin else ''}. CPU = utime+stime per request of the "
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


# -- main --------------------------------------------------------------------------------------
def _gateway_config(name: str, default: str, redis_url: str | None) -> str:
    """``gateway`` uses --config; ``gateway:VARIANT`` uses bench/gateway-VARIANT.yaml, with
    ``{redis_url}`` filled in (the rendered copy sits beside it, git-ignored)."""
    variant = name.partition(":")[2]
    if not variant:
        return default
    source = ROOT / "bench" / f"gateway-{variant}.yaml"
    text = source.read_text()
    if "{redis_url}" not in text:
        return str(source)
    if redis_url is None:
        raise SystemExit(f"{source.name} needs Redis but redis-server could not be started")
    rendered = source.with_name(f".rendered-{variant}.yaml")
    rendered.write_text(text.replace("{redis_url}", redis_url))
    return str(rendered)


def _command(name: str, port: int, upstream: str, config: str) -> list[str] | None:
    if name == "passthrough":
        return [PY, "bench/passthrough.py", "--port", str(port), "--upstream", upstream]
    if name.startswith("gateway"):
        return [PY, "-m", "gateway", "run", "--config", config, "--port", str(port), "--upstream", upstream]
    return None


async def main(args: argparse.Namespace) -> int:
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    logs = ROOT / "bench" / "results"  # git-ignored
    logs.mkdir(parents=True, exist_ok=True)
    up = _free_port()
    upstream = f"http://127.0.0.1:{up}"
    procs = {"mock": _spawn([PY, "-m", "gateway.upstream.mock", "--port", str(up)], logs / "mock.log")}
    targets: list[Target] = []
    redis_url: str | None = None
    try:
        if not await _ready(up, 15):
            print("mock upstream did not start; see bench/results/mock.log", file=sys.stderr)
            return 1
        mock_pid = procs["mock"].pid
        for name in names:
            if name == "direct":
                targets.append(Target("direct", up, mock_pid))
                continue
            port = _free_port()
            if "redis" in name and redis_url is None:
                rport = _free_port()
                procs["redis"] = _spawn(["redis-server", "--port", str(rport), "--save", "", "--appendonly",
                                         "no"], logs / "redis.log")
                redis_url = f"redis://127.0.0.1:{rport}/0"
                await asyncio.sleep(0.3)
            cmd = _command(name, port, upstream, _gateway_config(name, args.config, redis_url))
            if cmd is None:
                print(f"unknown target {name!r}", file=sys.stderr)
                return 2
            procs[name] = _spawn(cmd, logs / f"{name}.log")
            if await _ready(port, 20):
                targets.append(Target(name, port, procs[name].pid))
            else:
                print(
                    f"warning: {name} did not answer; skipped (see bench/results/{name}.log)", file=sys.stderr
                )
        everyone = {p.pid for p in procs.values()} | {os.getpid()}
        cpus = sorted(os.sched_getaffinity(0))
        cells: list[Cell] = []
        for t in targets:
            if args.pin and len(cpus) > 1:
                for pid in everyone - {t.pid}:
                    os.sched_setaffinity(pid, cpus[:-1])
                os.sched_setaffinity(t.pid, cpus[-1:])
            for mode in args.modes.split(","):
                for conc in (int(c) for c in args.concurrency.split(",")):
                    cell = await run_cell(t, mock_pid, mode == "stream", conc, args)
                    cells.append(cell)
                    print(
                        f"  {t.name:12} {cell.mode:6} c={conc:<3} {cell.rps:8.0f} req/s  "
                        f"p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:6.2f} ms  "
                        f"cpu {cell.cpu_us:5.0f} µs/req  err {cell.errors}",
                        file=sys.stderr,
                    )
        slow: list[SlowResult] = []
        for t in targets if args.slow_streams else []:
            if t.name != "direct":
                slow.append(await run_slow(t, args.slow_streams, args.slow_chunks))
                print(f"  slow streams: {slow[-1]}", file=sys.stderr)
        report = render(cells, slow, args)
        print(report)
        (logs / "latest.md").write_text(report + "\n")
        data = {"cells": [asdict(c) for c in cells], "slow": [asdict(s) for s in slow]}
        (logs / "latest.json").write_text(json.dumps(data, indent=1))
        failed = any(c.errors for c in cells) or any(s.completed != s.streams for s in slow)
        return 1 if failed else 0
    finally:
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
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each cell")
    ap.add_argument("--chunks", type=int, default=8, help="content chunks per streamed response")
    ap.add_argument("--config", default="bench/gateway-bench.yaml")
    ap.add_argument("--pin", action="store_true", help="pin the process under test to its own CPU")
    ap.add_argument("--slow-streams", type=int, default=0, metavar="N", help="also hold N slow streams")
    ap.add_argument("--slow-chunks", type=int, default=5, help="1-second chunks per slow stream")
    args = ap.parse_args(argv)
    if not 0 <= args.slow_streams <= 5000 or not 0 < args.duration <= 120:
        ap.error("--slow-streams must be in [0, 5000] and --duration in (0, 120]")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    # 1,000 streams need ~3,000 descriptors across the processes; children inherit the raised limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    sys.exit(uvloop.run(main(arguments)))
