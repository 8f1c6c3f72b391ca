"""Request ids the gateway makes: its own (never the client's), well-formed, unique, and not
shared with a forked child. End to end (response header, upstream header, access and audit
records): tests/functional/test_logs.py."""

from __future__ import annotations

import os
import re

from gateway.pipeline import _RandomIds, new_request_id

HEX24 = re.compile(r"^[0-9a-f]{24}$")


def test_ids_are_well_formed_and_unique() -> None:
    assert HEX24.match(new_request_id())
    assert len({new_request_id() for _ in range(100)}) == 100


def test_ids_are_unique_across_many_buffer_fills() -> None:
    ids = _RandomIds()
    made = [ids.next() for _ in range(_RandomIds.IDS_PER_FILL * 20 + 7)]
    assert all(HEX24.match(i) for i in made)
    assert len(set(made)) == len(made)


def test_a_forked_child_does_not_reuse_its_parents_next_ids() -> None:
    new_request_id()  # the module's buffer is filled in the parent before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        try:
            os.write(write, ",".join(new_request_id() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split(",")
    os.waitpid(pid, 0)
    parent = [new_request_id() for _ in range(8)]
    assert len(child) == 8 and all(HEX24.match(i) for i in child)
    assert not set(child) & set(parent)
