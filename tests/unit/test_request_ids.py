"""Request ids the gateway makes: well-formed, unique, and not shared with a forked child."""

from __future__ import annotations

import os
import re

from gateway.pipeline import _RandomIds, request_id_for

HEX24 = re.compile(r"^[0-9a-f]{24}$")


def test_a_well_formed_incoming_id_is_kept_and_a_bad_one_replaced() -> None:
    assert request_id_for("req-42.a:b_c") == "req-42.a:b_c"
    for bad in (None, "", "has space", "x" * 129, "new\nline"):
        made = request_id_for(bad)
        assert HEX24.match(made), (bad, made)


def test_ids_are_unique_across_many_buffer_fills() -> None:
    ids = _RandomIds()
    made = [ids.next() for _ in range(_RandomIds.IDS_PER_FILL * 20 + 7)]
    assert all(HEX24.match(i) for i in made)
    assert len(set(made)) == len(made)


def test_a_forked_child_does_not_reuse_its_parents_next_ids() -> None:
    request_id_for(None)  # the module's buffer is filled in the parent before the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        try:
            os.write(write, ",".join(request_id_for(None) for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split(",")
    os.waitpid(pid, 0)
    parent = [request_id_for(None) for _ in range(8)]
    assert len(child) == 8 and all(HEX24.match(i) for i in child)
    assert not set(child) & set(parent)
