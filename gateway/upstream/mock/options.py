"""Mock upstream options and per-request controls (override headers, fault injection)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, cast, get_args

Fault = Literal[
    "status-500",
    "status-429",
    "reset-mid-stream",
    "stall-mid-stream",
    "error-mid-stream",
    "hang",
    "slow-headers",
    "bad-json",
]
FAULTS: Final[tuple[str, ...]] = get_args(Fault)
# Reasoning written inline in the OpenAI answer's text, as a model served without a reasoning
# parser does: "open" starts the text with <think>, "template" leaves the opening tag to the chat
# template (the text starts inside the block and holds only </think>).
InlineMode = Literal["open", "template"]
INLINE_MODES: Final[tuple[str, ...]] = get_args(InlineMode)
# Faults that happen half-way through the body rather than before the status line.
MID_BODY_FAULTS: Final[frozenset[str]] = frozenset(
    {"reset-mid-stream", "stall-mid-stream", "error-mid-stream", "bad-json"}
)

HEADER_CHUNKS: Final = "x-mock-chunks"
HEADER_CHUNK_DELAY_MS: Final = "x-mock-chunk-delay-ms"
HEADER_FIRST_BYTE_DELAY_MS: Final = "x-mock-first-byte-delay-ms"
HEADER_FAULT: Final = "x-mock-fault"
HEADER_INLINE_REASONING: Final = "x-mock-inline-reasoning"

# Bounds keep a typo in a test header from turning into an hour-long or gigabyte-sized response.
MAX_CHUNKS: Final = 100_000
MAX_DELAY_S: Final = 600.0


@dataclass(frozen=True, slots=True)
class MockOptions:
    """Process-wide behaviour of the mock upstream; every field can be overridden per request
    where a header exists.

    chunks:            content deltas per choice in a stream (and content tokens when not streaming)
    chunk_delay:       seconds slept before each content/reasoning delta
    first_byte_delay:  seconds slept before the status line is sent
    history:           how many recent requests ``MockState`` keeps
    api_key:           when set, requests must carry it (``Authorization: Bearer`` or ``x-api-key``)
    hang_seconds:      upper bound of the ``hang`` and ``stall-mid-stream`` faults
    slow_headers_seconds: header delay of the ``slow-headers`` fault when no first-byte header is given
    embedding_dims:    default embedding length (requests may pass ``dimensions``)
    anthropic_ping:    send a ``ping`` event after ``message_start``, like the real API
    inline_reasoning:  chat completions and completions always reason, inline in the text
                       (``open`` or ``template``, see ``InlineMode``); None: in ``reasoning_content``
                       when asked to reason, as before
    """

    chunks: int = 8
    chunk_delay: float = 0.0
    first_byte_delay: float = 0.0
    history: int = 256
    api_key: str | None = None
    hang_seconds: float = 300.0
    slow_headers_seconds: float = 10.0
    embedding_dims: int = 64
    anthropic_ping: bool = True
    inline_reasoning: InlineMode | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.chunks <= MAX_CHUNKS:
            raise ValueError(f"chunks must be in [0, {MAX_CHUNKS}], got {self.chunks}")
        for name in ("chunk_delay", "first_byte_delay", "hang_seconds", "slow_headers_seconds"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_DELAY_S * 6:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value}")
        if self.history < 0:
            raise ValueError("history must be >= 0")
        if not 1 <= self.embedding_dims <= 8192:
            raise ValueError("embedding_dims must be in [1, 8192]")
        if self.inline_reasoning is not None and self.inline_reasoning not in INLINE_MODES:
            raise ValueError(f"inline_reasoning must be one of {', '.join(INLINE_MODES)}, "
                             f"got {self.inline_reasoning!r}")


@dataclass(frozen=True, slots=True)
class Control:
    """The effective behaviour of one request (options merged with its override headers)."""

    chunks: int
    chunk_delay: float
    first_byte_delay: float
    fault: Fault | None
    inline_reasoning: InlineMode | None = None


class ControlError(ValueError):
    """An override header has an invalid value (answered with a 400 so test mistakes are loud)."""


def _int_header(headers: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ControlError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ControlError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def resolve_control(options: MockOptions, headers: Mapping[str, str]) -> Control:
    """Merge ``options`` with the ``x-mock-*`` headers of one request."""
    chunks = _int_header(headers, HEADER_CHUNKS, 0, MAX_CHUNKS)
    max_ms = int(MAX_DELAY_S * 1000)
    delay_ms = _int_header(headers, HEADER_CHUNK_DELAY_MS, 0, max_ms)
    first_ms = _int_header(headers, HEADER_FIRST_BYTE_DELAY_MS, 0, max_ms)
    raw_fault = headers.get(HEADER_FAULT)
    fault: Fault | None = None
    if raw_fault is not None:
        raw_fault = raw_fault.strip().lower()
        if raw_fault not in FAULTS:
            raise ControlError(f"{HEADER_FAULT} must be one of {', '.join(FAULTS)}, got {raw_fault!r}")
        fault = cast(Fault, raw_fault)
    inline = options.inline_reasoning
    raw_inline = headers.get(HEADER_INLINE_REASONING)
    if raw_inline is not None:
        raw_inline = raw_inline.strip().lower()
        if raw_inline not in INLINE_MODES:
            raise ControlError(f"{HEADER_INLINE_REASONING} must be one of {', '.join(INLINE_MODES)}, "
                               f"got {raw_inline!r}")
        inline = cast(InlineMode, raw_inline)
    return Control(
        chunks=options.chunks if chunks is None else chunks,
        chunk_delay=options.chunk_delay if delay_ms is None else delay_ms / 1000,
        first_byte_delay=options.first_byte_delay if first_ms is None else first_ms / 1000,
        fault=fault,
        inline_reasoning=inline,
    )
