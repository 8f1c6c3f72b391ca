"""Policy and request files as text: UTF-8 or an error naming the file, line and column.

A bare ``read_text()`` turns one stray byte (a Latin-1 ``é`` pasted into a description) into a
UnicodeDecodeError traceback that names neither the file nor the line; policy errors must read
like every other policy error and end a command with the "invalid" exit code.
"""

from __future__ import annotations

from pathlib import Path

from gateway.yamlsource import ConfigError, Issue, Mark


def decode_utf8(data: bytes, name: str) -> str:
    """``data`` as text; raise :class:`ConfigError` at the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        # Everything before the first bad byte decodes, so the column can count characters.
        col = len(data[line_start:exc.start].decode("utf-8")) + 1
        issue = Issue(Mark(name, line, col), "",
                      f"invalid UTF-8 (byte 0x{data[exc.start]:02x}), expected a UTF-8 text file")
        raise ConfigError([issue]) from None


def read_utf8(path: Path, name: str) -> str:
    """Read ``path`` (reported as ``name``); unreadable or non-UTF-8 is a :class:`ConfigError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        unreadable = Issue(Mark(name, 1, 1), "", f"cannot read file: {reason}, expected a readable file")
        raise ConfigError([unreadable]) from None
    return decode_utf8(data, name)
