"""What a session has ready to send, in two bounded queues: control events first, then the ordered stream.

The ordered stream holds audio frames and the events tied to the audio timeline (`segment`, `flushed`, `done`,
the final close). Control events (`ready`, `error`, `warning`, `cleared`, a fatal close) overtake queued
audio, as pipecat's priorities do. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AudioFrame:
    data: bytes
    num_samples: int
    duration_ms: float


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class CloseFrame:
    code: int
    reason: str


OutItem = AudioFrame | TextEvent | CloseFrame


class Outbox:
    """Bounds: `control` holds at most `max_control_events` items (the caller treats a full one as a client
    that stopped reading); the audio in `ordered` is kept at or below the session's `max_buffer_ms` plus one
    frame by the session's pump, and its events (`ordered_events`) at the playout's `max_events` (the rest
    wait as tickets, which are bounded); the session stops reading input while half of `max_control_events`
    control events wait for the client.
    """

    def __init__(self, max_control_events: int) -> None:
        self.max_control_events = max_control_events
        self._control: deque[TextEvent | CloseFrame] = deque()
        self._ordered: deque[OutItem] = deque()
        self._ordered_events = 0  # items in `_ordered` that are not audio
        self.audio_ms = 0.0  # audio queued in `ordered`

    def push_control(self, item: TextEvent | CloseFrame) -> bool:
        """Queue a control item; False (and nothing queued) when the control queue is full."""
        if len(self._control) >= self.max_control_events:
            return False
        self._control.append(item)
        return True

    def push(self, item: OutItem) -> None:
        self._ordered.append(item)
        if isinstance(item, AudioFrame):
            self.audio_ms += item.duration_ms
        else:
            self._ordered_events += 1

    def peek(self) -> OutItem | None:
        if self._control:
            return self._control[0]
        return self._ordered[0] if self._ordered else None

    def pop(self) -> OutItem:
        if self._control:
            return self._control.popleft()
        item = self._ordered.popleft()
        if isinstance(item, AudioFrame):
            self.audio_ms = max(0.0, self.audio_ms - item.duration_ms)
        else:
            self._ordered_events -= 1
        return item

    @property
    def control_events(self) -> int:
        return len(self._control)

    @property
    def ordered_events(self) -> int:
        """Events and close frames in the ordered stream."""
        return self._ordered_events

    def has_audio(self) -> bool:
        return self.audio_ms > 0.0

    def clear_ordered(self) -> None:
        """Drop the ordered stream (on `clear` or a fatal error)."""
        self._ordered.clear()
        self._ordered_events = 0
        self.audio_ms = 0.0

    def clear_control(self) -> None:
        self._control.clear()

    def __len__(self) -> int:
        return len(self._control) + len(self._ordered)
