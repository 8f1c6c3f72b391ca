"""Poll files for changes and call back once they settle (debounced).

Polling (stat of a few files every interval) is portable, survives atomic renames and editors'
write-then-rename, and costs nothing measurable; inotify would add a dependency for no gain here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from gateway.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Signature = tuple[tuple[str, int, int, int], ...]


def signature(paths: Iterable[Path]) -> Signature:
    """Identity of a set of files: name, inode, size and mtime of each file found."""
    entries: list[tuple[str, int, int, int]] = []
    for path in paths:
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        for item in candidates:
            try:
                st = item.stat()
            except OSError:
                continue
            if item.is_file():
                entries.append((str(item), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(entries)


class FileWatcher:
    """Calls ``on_change`` when the files under ``paths`` change and then stay still for ``debounce``."""

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]],
        on_change: Callable[[], Awaitable[None]],
        interval: float = 1.0,
        debounce: float = 0.5,
    ) -> None:
        self._paths = [Path(p) for p in paths]
        self._on_change = on_change
        self._interval = interval
        self._debounce = debounce
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="file-watcher")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        last = await asyncio.to_thread(signature, self._paths)
        while True:
            await asyncio.sleep(self._interval)
            current = await asyncio.to_thread(signature, self._paths)
            if current == last:
                continue
            # Wait until the files stop changing: editors and deploy tools write in several steps.
            while True:
                await asyncio.sleep(self._debounce)
                settled = await asyncio.to_thread(signature, self._paths)
                if settled == current:
                    break
                current = settled
            last = current
            try:
                await self._on_change()
            except Exception:  # a failing reload must never stop the watcher
                log.exception("reload after file change failed")
