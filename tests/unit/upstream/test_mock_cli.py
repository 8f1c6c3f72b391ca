"""``python -m gateway.upstream.mock``: every numeric option is bounded with an argparse error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.upstream.mock.__main__ import MAX_DELAY_MS, build_parser, options_from
from gateway.upstream.mock.options import MAX_CHUNKS, MAX_DELAY_S


@pytest.mark.parametrize(("argv", "message"), [
    (["--chunks", str(MAX_CHUNKS + 1)],
     f"argument --chunks: expected a number of chunks from 0 to {MAX_CHUNKS}, got {MAX_CHUNKS + 1}"),
    (["--chunks", "-1"], f"argument --chunks: expected a number of chunks from 0 to {MAX_CHUNKS}, got -1"),
    (["--chunks", "1e9"],
     f"argument --chunks: expected a number of chunks from 0 to {MAX_CHUNKS}, got '1e9'"),
    (["--chunk-delay-ms", "-1"],
     "argument --chunk-delay-ms: expected milliseconds from 0 to 3600000, got -1"),
    (["--chunk-delay-ms", "nan"],
     "argument --chunk-delay-ms: expected milliseconds from 0 to 3600000, got nan"),
    (["--first-byte-delay-ms", "3600001"],
     "argument --first-byte-delay-ms: expected milliseconds from 0 to 3600000, got 3600001"),
    (["--first-byte-delay-ms", "inf"],
     "argument --first-byte-delay-ms: expected milliseconds from 0 to 3600000, got inf"),
    (["--port", "99999"], "argument --port: expected a port number 0-65535, got 99999"),
])
def test_out_of_range_values_are_argparse_errors(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m gateway.upstream.mock: error: {message}"


def test_the_bounds_themselves_are_accepted_by_mock_options() -> None:
    """The parser's range and MockOptions' own check agree: nothing accepted here fails later."""
    args = build_parser().parse_args(["--chunks", str(MAX_CHUNKS), "--chunk-delay-ms", str(MAX_DELAY_MS),
                                      "--first-byte-delay-ms", str(MAX_DELAY_MS), "--port", "0"])
    options = options_from(args)
    assert options.chunks == MAX_CHUNKS and options.chunk_delay == options.first_byte_delay == MAX_DELAY_S * 6
    low = options_from(build_parser().parse_args(["--chunks", "0"]))
    assert (low.chunks, low.chunk_delay, low.first_byte_delay) == (0, 0.0, 0.0)


def test_module_entry_point_exits_2_before_starting_a_server() -> None:
    """The real ``python -m`` spelling: a usage error, not a MockOptions traceback."""
    proc = subprocess.run([sys.executable, "-m", "gateway.upstream.mock", "--chunks", "100000000"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"python -m gateway.upstream.mock: error: argument --chunks: expected a number of chunks "
        f"from 0 to {MAX_CHUNKS}, got 100000000")
