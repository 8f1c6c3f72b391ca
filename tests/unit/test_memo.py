"""gateway.memo.make_room: bounded FIFO memos on plain dicts."""

from __future__ import annotations

from gateway.memo import make_room


def test_a_memo_below_its_bound_is_left_alone() -> None:
    memo = {i: str(i) for i in range(7)}
    make_room(memo, 8)
    assert memo == {i: str(i) for i in range(7)}


def test_a_full_memo_drops_its_oldest_eighth_in_insertion_order() -> None:
    memo = {i: i for i in range(64)}
    memo[0] = -1  # re-assigning a key keeps its place: insertion order, not last use
    make_room(memo, 64)
    assert list(memo) == list(range(8, 64))


def test_a_small_memo_drops_at_least_one() -> None:
    memo = {"a": 1, "b": 2, "c": 3}
    make_room(memo, 3)
    assert memo == {"b": 2, "c": 3}


def test_a_memo_over_a_lowered_bound_drops_down_below_it() -> None:
    memo = {i: i for i in range(100)}
    make_room(memo, 10)
    assert list(memo) == list(range(91, 100))


def test_a_memo_filled_through_make_room_stays_bounded_and_keeps_the_newest() -> None:
    memo: dict[int, int] = {}
    for i in range(10_000):
        make_room(memo, 256)
        memo[i] = i
        assert len(memo) <= 256
    # Entries leave oldest first: what is left is a run of the most recent keys.
    assert list(memo) == list(range(10_000 - len(memo), 10_000))
    assert len(memo) > 256 - 256 // 8
