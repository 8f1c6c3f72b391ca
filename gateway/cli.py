"""``gateway`` command line: run, mock-upstream, version, and the feature subcommands."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata

import uvloop

from gateway.settings import Settings, load_settings, with_overrides
from gateway.upstream.mock.options import MAX_CHUNKS, MAX_DELAY_S
from gateway.yamlsource import ConfigError

EXIT_INVALID = 2


def _version() -> str:
    try:
        return metadata.version("tollgate")
    except metadata.PackageNotFoundError:
        return "0.0.0+local"


def _feature_commands() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    """Subcommands owned by features (policy, keys, simulate...): each module adds its own."""
    from gateway.commands import feature_commands

    return feature_commands()


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        # Left alone, the kernel takes 99999 modulo 65536 and listens on an unexpected port.
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value}")
    return value


def int_in_range(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """argparse type: an integer from ``low`` to ``high`` (None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def float_in_range(low: float, high: float, what: str) -> Callable[[str], float]:
    """argparse type: a finite number from ``low`` to ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Tollgate: a policy gateway for model APIs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", required=True, help="gateway config file (YAML)")
    run.add_argument("--host", help="listen address (overrides listen.host)")
    run.add_argument("--port", type=port_number, help="listen port 0-65535 (overrides listen.port)")
    run.add_argument("--upstream", help="base URL of the default upstream (overrides the config)")
    run.add_argument("--workers", type=int_in_range(1, None, "a positive number of worker processes"),
                     help="worker processes sharing the port (SO_REUSEPORT)")
    run.set_defaults(func=_cmd_run)

    mock = sub.add_parser("mock-upstream", help="run the built-in mock model upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=port_number, default=9000)
    chunks = int_in_range(0, MAX_CHUNKS, f"a number of chunks from 0 to {MAX_CHUNKS}")
    mock.add_argument("--chunks", type=chunks, default=8, help="content deltas per streamed choice")
    max_delay_ms = MAX_DELAY_S * 6 * 1000  # what MockOptions accepts for chunk_delay
    mock.add_argument("--chunk-delay-ms", default=0.0, help="delay before each delta",
                      type=float_in_range(0.0, max_delay_ms, f"milliseconds from 0 to {max_delay_ms:.0f}"))
    mock.set_defaults(func=_cmd_mock)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda args: print(_version()) or 0)

    for add in _feature_commands():
        add(sub)
    return parser


def _load(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    return with_overrides(settings, host=args.host, port=args.port, upstream=args.upstream,
                          workers=args.workers)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = _load(args)
        from gateway.wiring import check_deployment

        check_deployment(settings)
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return EXIT_INVALID
    logging.basicConfig(level=settings.logging.level, stream=sys.stderr,
                        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}')
    if settings.workers == 1:
        return _serve_worker(args, 0)
    return _supervise(args, settings)


def _serve_worker(args: argparse.Namespace, index: int) -> int:
    from gateway.policy.reload import PolicyTestsFailed
    from gateway.server import serve

    try:
        settings = _load(args)
        return uvloop.run(serve(settings, worker_index=index))
    except ConfigError as exc:
        print(f"gateway: invalid configuration:\n{exc}", file=sys.stderr)
    except PolicyTestsFailed as exc:
        print(f"gateway: the policy tests fail, refusing to start:\n{exc}", file=sys.stderr)
    except OSError as exc:  # the port is taken, a file is unreadable...
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
    return EXIT_INVALID


def _worker_main(args: argparse.Namespace, index: int) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(_serve_worker(args, index))


# After the drain and the grace, a worker still settles the requests it cut (SETTLE_AFTER_CUT,
# which aiohttp may spend twice: waiting for a handler, then for its cancellation) and stops its
# components (stores flushed, logs written): the supervisor allows this much on top before it
# kills a worker.
STOP_MARGIN = 15.0
_JOIN_POLL = 1.0  # a stop signal arriving while the supervisor waits is acted on this soon


def _exit_status(code: int | None, stopping: bool) -> int:
    """A worker's exit code as a shell reports it: 128 + N for a worker ended by signal N, except
    for the stop signal it was sent before it could install its handlers (still starting up)."""
    if code is None:
        return 1
    if stopping and code in (-signal.SIGTERM, -signal.SIGINT):
        return 0
    return 128 - code if code < 0 else code


def _supervise(args: argparse.Namespace, settings: Settings) -> int:
    """Start N workers on one port (SO_REUSEPORT); forward signals; exit when they all have.

    Workers still running ``drain_delay + grace + STOP_MARGIN`` after the first SIGTERM/SIGINT are
    killed (SIGKILL), and the exit status says so (137); otherwise it is the highest of theirs."""
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_worker_main, args=(args, i), name=f"gateway-worker-{i}")
             for i in range(settings.workers)]
    for proc in procs:
        proc.start()
    budget = settings.shutdown.drain_delay + settings.shutdown.grace + STOP_MARGIN
    kill_at: float | None = None  # monotonic time; None until a stop is asked

    def forward(signum: int, _frame: object) -> None:
        nonlocal kill_at
        if signum != signal.SIGHUP and kill_at is None:
            kill_at = time.monotonic() + budget
        # A second SIGTERM is forwarded too: the workers then cut their drain short.
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while alive := [proc for proc in procs if proc.exitcode is None]:  # exitcode reaps
        wait = _JOIN_POLL
        if kill_at is not None:
            wait = kill_at - time.monotonic()
            if wait <= 0:
                for proc in alive:
                    print(f"gateway: worker {proc.name} still running {budget:g}s after the stop signal "
                          "(drain_delay + grace + margin): killed", file=sys.stderr)
                    proc.kill()
                    proc.join()
                break
        multiprocessing.connection.wait([proc.sentinel for proc in alive], min(wait, _JOIN_POLL))
    return max(_exit_status(proc.exitcode, kill_at is not None) for proc in procs)


def _cmd_mock(args: argparse.Namespace) -> int:
    from gateway.upstream.mock_server import MockOptions, run_mock

    options = MockOptions(chunks=args.chunks, chunk_delay=args.chunk_delay_ms / 1000)
    uvloop.run(run_mock(args.host, args.port, options))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(code or 0)
