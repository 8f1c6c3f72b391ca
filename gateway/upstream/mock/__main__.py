"""``python -m gateway.upstream.mock [--host] [--port] [--chunks N] [--chunk-delay-ms D]``.

A stand-alone entry point (always on uvloop) so the benchmark and the demo can start the mock
without the full gateway CLI; ``gateway mock-upstream`` is the user-facing spelling.
"""

from __future__ import annotations

import argparse
import contextlib

import uvloop

# The same argparse range types as ``gateway mock-upstream``, so both spellings refuse the same
# values with the same message instead of a MockOptions traceback (or a kernel-wrapped port).
from gateway.cli import float_in_range, int_in_range, port_number

from ..mock_server import run_mock
from .options import MAX_CHUNKS, MAX_DELAY_S, MockOptions

# What MockOptions accepts for its delays, in the milliseconds the flags take.
MAX_DELAY_MS = MAX_DELAY_S * 6 * 1000


def build_parser() -> argparse.ArgumentParser:
    """The mock's options, each bounded to what :class:`MockOptions` accepts."""
    parser = argparse.ArgumentParser(prog="python -m gateway.upstream.mock", description=__doc__)
    delay_ms = float_in_range(0.0, MAX_DELAY_MS, f"milliseconds from 0 to {MAX_DELAY_MS:.0f}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=9000)
    parser.add_argument("--chunks", default=MockOptions().chunks,
                        type=int_in_range(0, MAX_CHUNKS, f"a number of chunks from 0 to {MAX_CHUNKS}"),
                        help=f"content deltas per streamed choice (0-{MAX_CHUNKS})")
    parser.add_argument("--chunk-delay-ms", type=delay_ms, default=0.0, help="delay before each delta")
    parser.add_argument("--first-byte-delay-ms", type=delay_ms, default=0.0,
                        help="delay before the status line")
    parser.add_argument("--api-key", default=None, help="require this key (Bearer or x-api-key)")
    return parser


def options_from(args: argparse.Namespace) -> MockOptions:
    """The :class:`MockOptions` of parsed arguments (the flags take milliseconds)."""
    return MockOptions(
        chunks=args.chunks,
        chunk_delay=args.chunk_delay_ms / 1000,
        first_byte_delay=args.first_byte_delay_ms / 1000,
        api_key=args.api_key,
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    options = options_from(args)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run_mock(args.host, args.port, options))


if __name__ == "__main__":
    main()
