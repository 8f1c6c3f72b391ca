"""One "gateway process" for the multi-process exactness test.

Usage: python -m tests.support.load_worker URL KEY ALGO LIMIT REQUESTS
Prints ``ready`` once connected, waits for a line on stdin, fires REQUESTS concurrent charges
against one key, prints how many were admitted.
"""

from __future__ import annotations

import asyncio
import sys
import uuid

from gateway.store.base import Algorithm, Charge
from gateway.store.redis import RedisStore


async def main(url: str, key: str, algo: str, limit: int, requests: int) -> None:
    store = RedisStore.from_url(url, deadline=10.0, max_connections=requests)
    await store.ping()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    algorithm = Algorithm(algo)
    charges = [Charge(key, algorithm, limit, 3_600_000, 1, burst=limit,
                      lease_id=uuid.uuid4().hex if algorithm is Algorithm.LEASE else "")
               for _ in range(requests)]
    results = await asyncio.gather(*(store.charge([c]) for c in charges))
    print(sum(r.allowed for r in results), flush=True)
    await store.close()


if __name__ == "__main__":
    url, key, algo, limit, requests = sys.argv[1:6]
    asyncio.run(main(url, key, algo, int(limit), int(requests)))
