"""``python -m gateway.upstream.mock [--host] [--port] [--chunks N] [--chunk-delay-ms D]``.

A stand-alone entry point (always on uvloop) so the benchmark and the demo can start the mock
without the full gateway CLI; ``gateway mock-upstream`` is the user-facing spelling.
"""

from __future__ import annotations

import argparse
import contextlib

import uvloop

from ..mock_server import run_mock
from .options import MockOptions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.upstream.mock", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunks", type=int, default=MockOptions().chunks)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--first-byte-delay-ms", type=float, default=0.0)
    parser.add_argument("--api-key", default=None, help="require this key (Bearer or x-api-key)")
    args = parser.parse_args(argv)
    options = MockOptions(
        chunks=args.chunks,
        chunk_delay=args.chunk_delay_ms / 1000,
        first_byte_delay=args.first_byte_delay_ms / 1000,
        api_key=args.api_key,
    )
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run_mock(args.host, args.port, options))


if __name__ == "__main__":
    main()
