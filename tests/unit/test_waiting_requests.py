"""The cut of requests waiting on their upstream (gateway.stages.draining.WaitingRequests), on real
asyncio tasks: only the gateway's own cancellation turns into an answer."""

from __future__ import annotations

import asyncio

from gateway.stages.draining import WaitingRequests


async def wait_on_upstream(waiting: WaitingRequests, upstream: asyncio.Event) -> str:
    """What the forwarder does around its wait: register, wait, and tell a cut from a cancel."""
    task = asyncio.current_task()
    assert task is not None
    if not waiting.add(task):
        return "refused"
    try:
        await upstream.wait()
        return "answered by the upstream"
    except asyncio.CancelledError:
        if not waiting.cut(task):
            raise
        return "answered 503"
    finally:
        waiting.discard(task)


async def test_the_cut_answers_the_waiting_requests_and_refuses_later_ones() -> None:
    waiting, upstream = WaitingRequests(), asyncio.Event()
    requests = [asyncio.ensure_future(wait_on_upstream(waiting, upstream)) for _ in range(3)]
    await asyncio.sleep(0)  # each is waiting
    assert waiting.end_all() == 3
    assert await asyncio.gather(*requests) == ["answered 503"] * 3
    # Answered, their tasks are no longer being cancelled: what follows (settling) runs normally.
    assert all(r.cancelling() == 0 for r in requests)
    assert await wait_on_upstream(waiting, upstream) == "refused"


async def test_a_request_whose_client_went_away_too_is_not_answered() -> None:
    waiting, upstream = WaitingRequests(), asyncio.Event()
    gone = asyncio.ensure_future(wait_on_upstream(waiting, upstream))
    cut_only = asyncio.ensure_future(wait_on_upstream(waiting, upstream))
    await asyncio.sleep(0)
    gone.cancel()  # its client disconnected (aiohttp cancels the handler), as the grace ran out
    assert waiting.end_all() == 2
    assert await cut_only == "answered 503"
    try:
        await gone
    except asyncio.CancelledError:
        assert gone.cancelled()
    else:
        raise AssertionError("a request whose client went away was answered")


async def test_a_request_already_answered_by_its_upstream_is_left_alone() -> None:
    waiting, upstream = WaitingRequests(), asyncio.Event()
    request = asyncio.ensure_future(wait_on_upstream(waiting, upstream))
    await asyncio.sleep(0)
    upstream.set()
    assert await request == "answered by the upstream"
    assert waiting.end_all() == 0
