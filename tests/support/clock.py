"""A hand-driven clock for code that takes ``clock: Callable[[], float]``."""

from __future__ import annotations


class FakeClock:
    """Wall-clock seconds that move only when told to."""

    def __init__(self, start: float = 1_700_000_000.125) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
