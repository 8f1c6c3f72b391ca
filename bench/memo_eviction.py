"""Cost of inserting a new key into a full bounded memo: one-at-a-time eviction vs gateway.memo.

The quota stage, the Redis store and the risk memos bound their dicts by entry count. Evicting
one entry per insert (``del memo[next(iter(memo))]``) looks O(1) but is not: a dict keeps the
slots of deleted entries until it resizes, and iteration scans past them, so every insert into a
full memo pays for the entries deleted before it. :func:`gateway.memo.make_room` drops the
oldest eighth at once instead. Each new key here is distinct, as under traffic from many
accounts or addresses (each request brings a key the memo has not seen):

    .venv/bin/python bench/memo_eviction.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from gateway.memo import make_room


def evict_one(memo: dict[object, object], max_entries: int) -> None:
    if len(memo) >= max_entries:
        del memo[next(iter(memo))]


def per_insert_us(evict: Callable[[dict[object, object], int], None], size: int, inserts: int) -> float:
    memo: dict[object, object] = {}
    for i in range(size):  # full, and every entry has been inserted once
        evict(memo, size)
        memo[("warm", i)] = i
    keys = [("new", i) for i in range(inserts)]
    start = time.perf_counter()
    for key in keys:
        evict(memo, size)
        memo[key] = key
    elapsed = time.perf_counter() - start
    assert len(memo) <= size
    return elapsed / inserts * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inserts", type=int, default=50_000, help="new keys inserted into each full memo")
    args = ap.parse_args()
    print(f"µs per insert of a new key into a full memo ({args.inserts:,} inserts, best of 3)\n")
    print("| entries | one evicted per insert | oldest eighth at once (gateway.memo) |")
    print("|---:|---:|---:|")
    for size in (1024, 16384):
        one = min(per_insert_us(evict_one, size, args.inserts) for _ in range(3))
        eighth = min(per_insert_us(make_room, size, args.inserts) for _ in range(3))
        print(f"| {size:,} | {one:.2f} | {eighth:.2f} |")


if __name__ == "__main__":
    main()
