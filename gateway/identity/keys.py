"""Gateway-issued API keys: a YAML file of key hashes, looked up by hash, hot-reloaded.

Keys are ``tg_`` plus 256 random bits. Only ``sha256(key)`` is stored. A slow password hash
(bcrypt, argon2) exists to make guessing *low-entropy* secrets expensive; against 256 random
bits guessing is hopeless anyway, and a per-request bcrypt would cost ~100 ms of CPU and force
a cache keyed by the plaintext. SHA-256 lets us index the file by hash: lookup is one hash and one
dict probe, followed by a constant-time comparison of the stored hash.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gateway.context import Principal
from gateway.tasks import cancel_and_wait
from gateway.watch import FileWatcher
from gateway.yamlsource import ConfigError, Issue, Issues, Mark, Node

log = logging.getLogger(__name__)

KEY_PREFIX = "tg_"
HASH_PREFIX = "sha256:"
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RECORD_KEYS = {"id", "hash", "account", "org", "tier", "label", "created_at", "disabled",
                "revoked_at", "attributes"}
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def generate_key() -> str:
    """A new secret key: ``tg_`` + 43 url-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """A public, non-secret identifier for a key (safe to log and audit)."""
    return "key_" + secrets.token_hex(6)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """One issued key, as stored (never the key itself)."""

    key_id: str
    key_hash: str
    account: str
    org: str | None = None
    tier: str | None = None
    label: str | None = None
    created_at: float | None = None
    disabled: bool = False
    attributes: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def principal(self) -> Principal:
        """A fresh Principal per request (stages may write to it; the record stays shared)."""
        return Principal(authenticated=True, source="api_key", key_id=self.key_id,
                         account=self.account, org=self.org, tier=self.tier,
                         created_at=self.created_at, attributes=self.attributes)


@dataclass(frozen=True, slots=True)
class KeySet:
    """An immutable snapshot of the keys file."""

    by_hash: Mapping[str, ApiKeyRecord] = field(default_factory=dict)
    source: str = "<none>"

    def find(self, presented: str) -> ApiKeyRecord | None:
        """The record for ``presented`` (disabled ones included: the caller decides), or None."""
        digest = hash_key(presented)
        record = self.by_hash.get(digest)
        # The dict probe already matched; the constant-time comparison keeps the check itself
        # free of early-exit timing should the index ever be replaced by something looser.
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            return None
        return record

    def __len__(self) -> int:
        return len(self.by_hash)


def parse_keys(text: str, filename: str) -> KeySet:
    """Parse a keys file; raises ConfigError listing every problem with file:line:col."""
    issues = Issues()
    root = Node.parse(text, filename, issues)
    records: dict[str, ApiKeyRecord] = {}
    if root is not None and root.expect_mapping():
        root.check_keys({"keys", "version"})
        version = root.get("version", int, 1)
        if version != 1:
            root.error("unsupported keys file version; expected 1", "version")
        keys = root.child("keys")
        ids: set[str] = set()
        if keys is not None and keys.value is not None and keys.expect_list("a list of keys"):
            for item in keys.elements():
                record = _parse_record(item)
                if record is None:
                    continue
                if record.key_id in ids:
                    item.error(f"duplicate key id '{record.key_id}'", "id")
                if record.key_hash in records:
                    item.error("duplicate key hash (the same key is listed twice)", "hash")
                ids.add(record.key_id)
                records[record.key_hash] = record
    issues.raise_if_errors()
    return KeySet(MappingProxyType(records), filename)


def load_keys_file(path: Path) -> KeySet:
    """Read and parse ``path`` (blocking)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Issue(Mark(str(path), 1, 1), "", f"cannot read keys file: {exc}")]) from exc
    return parse_keys(text, str(path))


def _parse_record(node: Node) -> ApiKeyRecord | None:
    if not node.expect_mapping("a key mapping"):
        return None
    node.check_keys(_RECORD_KEYS, required=("id", "hash", "account"))
    key_id = node.get("id", str)
    if key_id is not None and not _ID_RE.fullmatch(key_id):
        _at(node, "id", "expected 1-64 letters, digits, '_', '.' or '-'")
    key_hash = node.get("hash", str)
    if key_hash is not None and not _HASH_RE.fullmatch(key_hash):
        _at(node, "hash", "expected 'sha256:' followed by 64 lowercase hex digits")
    account = node.get("account", str)
    attrs: dict[str, Any] = {}
    anode = node.child("attributes")
    if anode is not None and anode.expect_mapping():
        for name, child in anode.items():
            if isinstance(child.value, (str, int, float, bool)) or child.value is None:
                attrs[name] = child.value
            else:
                child.error("expected a string, number or boolean")
    created = _timestamp(node.child("created_at"))
    disabled = node.get("disabled", bool, False) or node.has("revoked_at")
    if not (key_id and key_hash and account):
        return None  # already reported; the whole file is rejected
    return ApiKeyRecord(key_id, key_hash, account, node.get("org", str), node.get("tier", str),
                        node.get("label", str), created, bool(disabled), MappingProxyType(attrs))


def _at(node: Node, key: str, message: str) -> None:
    """Report at the value (where the fix goes), not at the key."""
    child = node.child(key)
    (child.error(message) if child is not None else node.error(message, key))


def _timestamp(node: Node | None) -> float | None:
    """ISO 8601 text, a YAML timestamp or epoch seconds."""
    if node is None or node.value is None:
        return None
    value = node.value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            node.error("expected an ISO 8601 time such as 2025-01-31T12:00:00Z")
            return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    node.error("expected an ISO 8601 time")
    return None


class KeyRing:
    """Holds the current :class:`KeySet`; reloads the file when it changes.

    A file that fails to parse leaves the last good set in place; the errors are logged
    (file:line:col, never key material) and kept in :attr:`last_error` for status.
    """

    def __init__(self, path: Path, reload_interval: float = 2.0) -> None:
        self.path = path
        self._interval = reload_interval
        self._current = KeySet(source=str(path))
        self._file_id: tuple[int, int, int] | None = None
        self.last_error: ConfigError | None = None
        self.reloads = 0
        self._watcher: FileWatcher | None = None
        self._catch_up: asyncio.Task[None] | None = None

    @property
    def current(self) -> KeySet:
        return self._current

    def load(self) -> None:
        """Load synchronously; raises ConfigError (start-up must not run without its keys)."""
        file_id = _file_id(self.path)
        self._current = load_keys_file(self.path)
        self._file_id = file_id
        self.last_error = None

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        if self._interval > 0 and self._watcher is None:
            self._watcher = FileWatcher([self.path], self._on_change, interval=self._interval,
                                        debounce=min(self._interval, 0.5))
            self._watcher.start()
            # The watcher's baseline is taken after our load; re-read once so a file replaced
            # in between is not missed until its next change.
            self._catch_up = asyncio.create_task(self._reload_later(self._interval), name="keys-catch-up")

    async def _reload_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.reload()

    async def _on_change(self) -> None:
        await self.reload()

    async def reload(self) -> bool:
        """Re-read the file off the event loop if it changed; True if a new set is now current."""
        file_id = await asyncio.to_thread(_file_id, self.path)
        if file_id is not None and file_id == self._file_id:
            return False
        try:
            fresh = await asyncio.to_thread(load_keys_file, self.path)
        except ConfigError as exc:
            self.last_error = exc
            log.error("keys file not reloaded, keeping %d keys from the last good version:\n%s",
                      len(self._current), exc)
            return False
        self._current = fresh
        self._file_id = file_id
        self.last_error = None
        self.reloads += 1
        log.info("keys file reloaded: %d keys", len(fresh))
        return True

    async def close(self) -> None:
        await cancel_and_wait(self._catch_up)
        self._catch_up = None
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
