"""Editing the API keys file safely: under a lock, through symlinks, comments kept.

The file is rewritten atomically (temp file + fsync + rename, so the running gateway's watcher
only ever sees a complete file) under an advisory lock (two concurrent ``keys create`` must not
lose a key). A file that does not parse is refused rather than rewritten, so a broken file is
never made worse.

A symlinked keys file (config management, a secrets directory, Kubernetes' ``..data`` links) is
written *through*: the final target is replaced, in its own directory, so the link survives.
The target keeps its permission bits and, where allowed, its owner.

Edits are spliced into the existing text: ``appended`` adds one record after the last one,
``revoked`` sets ``disabled``/adds ``revoked_at`` inside that record; every other line, comments
included, stays byte for byte. Each splice is re-parsed and must mean exactly the intended
document, or the file is re-serialised whole instead: then only the leading comment block (the
header) survives. That fallback is for layouts a line edit cannot safely touch: a flow-style
``keys: [...]`` list with entries, a flow-style root mapping, a record split over lines in flow
style, an empty file.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.identity.keys import load_keys_file
from gateway.yamlsource import ConfigError

_HEADER = ("# Tollgate API keys. Only SHA-256 hashes are stored; manage with `gateway keys ...`.\n"
           "# A key is revoked by `disabled: true` (or `revoked_at`); the gateway reloads this file.\n")
# libyaml where present, as the gateway itself parses the file: a pure-Python parse of a large
# keys file takes seconds.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# YAML's line breaks (PyYAML also breaks at NEL, LS and PS); marks count lines by these.
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")
_NEW_FILE_MODE = 0o600


# ---- reading under the lock, writing through symlinks -----------------------------------------
@dataclass(slots=True)
class KeysFile:
    """The keys file as read under the lock."""

    target: Path  # the file at the end of the symlinks, resolved once: what was read is written
    text: str | None  # None: the file does not exist yet
    loaded: dict[str, Any]  # the parsed document, as the text says it

    def save(self, text: str) -> None:
        atomic_write(self.target, text)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[KeysFile | None]:
    """Yield the validated file under the lock, or None (reported) when it does not parse."""
    target = _target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target, not the link: two links to one file must share a lock.
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            yield KeysFile(target, None, {})
            return
        try:
            load_keys_file(path)  # full validation with file:line errors first
        except ConfigError as exc:
            print(f"refusing to modify an invalid keys file:\n{exc}", file=sys.stderr)
            yield None
            return
        # newline="": keep CRLF files CRLF; a splice must not rewrite every line ending.
        with open(target, encoding="utf-8", newline="") as fh:
            text = fh.read()
        yield KeysFile(target, text, yaml.load(text, Loader=_LOADER) or {})


def _target(path: Path) -> Path:
    """The file at the end of ``path``'s symlinks (``path`` itself when it is no link).

    Raises OSError(ELOOP) for a symlink loop: writing "through" it would replace a link.
    """
    loop = OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    try:
        target = path.resolve()
    except RuntimeError as exc:  # Python < 3.13 reports a loop this way...
        raise loop from exc
    try:
        os.stat(target)
    except FileNotFoundError:
        pass  # a new file, or a dangling link whose target is created
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # ...later ones return the looping path unresolved
            raise loop from exc
        raise
    return target


def atomic_write(path: Path, text: str) -> None:
    """Replace the file ``path`` names (through any symlinks) with ``text``, atomically.

    The temp file lives in the target's directory (rename is atomic only within one file
    system) and gets the target's mode (0600 for a new file) before any key material is in it.
    """
    target = _target(path)
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st else _NEW_FILE_MODE)
        made = os.fstat(fd)
        if st is not None and (st.st_uid, st.st_gid) != (made.st_uid, made.st_gid):
            _keep_owner(fd, st, target)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory is synced. Some file systems refuse
    # fsync on a directory; the rename has happened either way.
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _keep_owner(fd: int, st: os.stat_result, target: Path) -> None:
    # root editing a file the gateway user owns must not leave it unreadable to the gateway.
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
    except PermissionError:
        print(f"warning: {target} is now owned by uid {os.getuid()}, not uid {st.st_uid} gid {st.st_gid}: "
              "check the gateway can still read it", file=sys.stderr)


# ---- the edits: a verified splice, else the whole document -------------------------------------
def appended(current: KeysFile, record: dict[str, Any]) -> str:
    expected = copy.deepcopy(current.loaded)
    expected["keys"] = [*(expected.get("keys") or []), record]
    return rewrite(current, expected, lambda lines, root: _splice_append(lines, root, record))


def revoked(current: KeysFile, index: int, updates: dict[str, Any]) -> str:
    expected = copy.deepcopy(current.loaded)
    expected["keys"][index].update(updates)
    return rewrite(current, expected, lambda lines, root: _splice_update(lines, root, index, updates))


def rewrite(current: KeysFile, expected: dict[str, Any],
             splice: Callable[[_Lines, yaml.Node], str | None]) -> str:
    """The new text: ``splice``'s edit when it re-parses to exactly ``expected``, else a re-dump."""
    root = yaml.compose(current.text, Loader=_LOADER) if current.text is not None else None
    if current.text is not None and root is not None:
        candidate = splice(_Lines(current.text), root)
        if candidate is not None:
            try:
                if yaml.load(candidate, Loader=_LOADER) == expected:
                    return candidate
            except yaml.YAMLError:
                pass  # a splice this module got wrong: fall back rather than write it
    doc = {"version": expected.get("version", 1), "keys": expected["keys"]}
    return _header(current.text) + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _header(text: str | None) -> str:
    """The file's leading comment block (kept by a full rewrite), or the default header."""
    header: list[str] = []
    for line in _LINE_BREAK.split(text or ""):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        header.append(line + "\n")
    while header and not header[-1].strip():
        header.pop()
    return "".join(header) if header else _HEADER


class _Lines:
    """``text`` addressed by the (line, column) marks of its YAML nodes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts = [0, *(m.end() for m in _LINE_BREAK.finditer(text))]
        self.newline = "\r\n" if "\r\n" in text else "\n"

    def offset(self, mark: yaml.Mark) -> int:
        return self.starts[mark.line] + mark.column

    def after_line_of(self, mark: yaml.Mark) -> tuple[int, str]:
        """Where a new line goes after the line ``mark`` ends on, and a break to put first."""
        if mark.column == 0:  # a block scalar's end: already at the start of the next line
            return self.starts[mark.line], ""
        if mark.line + 1 < len(self.starts):
            return self.starts[mark.line + 1], ""
        return len(self.text), self.newline  # the last line has no line break

    def insert(self, at: int, new: str, end: int | None = None) -> str:
        return self.apply([(at, at if end is None else end, new)])

    def apply(self, edits: list[tuple[int, int, str]]) -> str:
        """``text`` with each ``(start, end, new)`` span replaced (spans must not overlap)."""
        text = self.text
        for start, end, new in sorted(edits, reverse=True):  # last first: earlier offsets hold
            text = text[:start] + new.replace("\n", self.newline) + text[end:]
        return text


def _keys_node(root: yaml.Node) -> tuple[yaml.ScalarNode, yaml.Node] | None:
    """The ``keys:`` key and value of a block-style root mapping."""
    if not isinstance(root, yaml.MappingNode) or root.flow_style:
        return None
    return next(((k, v) for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "keys"), None)


def _splice_append(lines: _Lines, root: yaml.Node, record: dict[str, Any]) -> str | None:
    found = _keys_node(root)
    if found is None:
        return None
    key, seq = found
    item = yaml.safe_dump([record], sort_keys=False, allow_unicode=True, default_flow_style=False)
    if isinstance(seq, yaml.ScalarNode) and seq.value == "" and seq.tag == "tag:yaml.org,2002:null":
        at, lead = lines.after_line_of(key.end_mark)  # `keys:` with nothing: the list starts below
        return lines.insert(at, lead + _indent(item, key.start_mark.column))
    if not isinstance(seq, yaml.SequenceNode):
        return None
    if seq.flow_style:
        if seq.value or seq.start_mark.line != seq.end_mark.line:
            return None
        # `keys: []  # none yet` -> `keys:  # none yet` with a block list below it.
        start = lines.offset(seq.start_mark)
        while start > 0 and lines.text[start - 1] == " ":
            start -= 1
        at, lead = lines.after_line_of(seq.end_mark)
        return lines.apply([(start, lines.offset(seq.end_mark), ""),
                            (at, at, lead + _indent(item, key.start_mark.column))])
    at, lead = lines.after_line_of(_content_end(seq))
    return lines.insert(at, lead + _indent(item, seq.start_mark.column))


def _splice_update(lines: _Lines, root: yaml.Node, index: int, updates: dict[str, Any]) -> str | None:
    found = _keys_node(root)
    if found is None or not isinstance(found[1], yaml.SequenceNode) or found[1].flow_style:
        return None
    node = found[1].value[index]
    if not isinstance(node, yaml.MappingNode):
        return None
    existing = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    edits: list[tuple[int, int, str]] = []
    added: dict[str, Any] = {}
    for name, value in updates.items():
        old = existing.get(name)
        if old is None:
            added[name] = value
        elif isinstance(old, yaml.ScalarNode) and old.start_mark.line == old.end_mark.line:
            start, end = lines.offset(old.start_mark), lines.offset(old.end_mark)
            # `disabled:` with no value is an empty scalar right after the colon
            edits.append((start, end, ("" if end > start else " ") + _scalar(value)))
        else:
            return None
    if added and node.flow_style:  # `- {id: a, ...}` on one line: add before the closing brace
        close = lines.offset(node.end_mark) - 1
        if node.start_mark.line != node.end_mark.line or lines.text[close] != "}":
            return None
        edits.append((close, close, "".join(f", {k}: {_scalar(v)}" for k, v in added.items())))
    elif added:  # block record: new lines after its last value, at its keys' column
        block = yaml.safe_dump(added, sort_keys=False, allow_unicode=True, default_flow_style=False)
        at, lead = lines.after_line_of(_content_end(node))
        edits.append((at, at, lead + _indent(block, node.start_mark.column)))
    return lines.apply(edits)


def _content_end(node: yaml.Node) -> yaml.Mark:
    """The end of ``node``'s last value, before any trailing comments or blank lines.

    A block collection's own end mark sits at the next token, i.e. after trailing comments that
    may belong to what follows, so descend to the last leaf (or flow collection) instead.
    """
    while isinstance(node, yaml.CollectionNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(node, yaml.MappingNode) else last
    return node.end_mark


def _indent(block: str, column: int) -> str:
    return "".join(" " * column + line for line in block.splitlines(keepends=True))


def _scalar(value: Any) -> str:
    """``value`` as one flow scalar, quoted as safe_dump would (a timestamp string stays a string)."""
    return yaml.safe_dump([value], default_flow_style=True, allow_unicode=True, width=1 << 20).strip()[1:-1]
