"""Gateway processes started by the functional tests (``gateway run`` as a subprocess)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

import aiohttp


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0,
                     output: Callable[[], str] = lambda: "") -> None:
    """Until ``url``/readyz answers 200; fails at once if ``proc`` exits, and after ``timeout``
    seconds, with what ``output`` returns (the process's log) in the message."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited with {proc.returncode}:\n{output()}")
            try:
                async with session.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"gateway did not become ready at {url} within {timeout}s:\n{output()}")
