"""Functional tests run the whole gateway: any blocking call it makes on the event loop fails them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail the test if gateway code blocks the event loop (file or socket I/O, sleep, locks...).

    Only calls made from the ``gateway`` package are checked: the tests themselves may write
    fixture files synchronously."""
    with blockbuster_ctx("gateway") as bb:
        yield bb
