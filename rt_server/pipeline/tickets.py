"""A session's pending output, in submission order: segments (waiting for or holding audio), flushes, close.

Pure. Bound: the session admits at most `max_pending_tickets` tickets; a segment ticket holds one segment's
audio (at most 510 phonemes' worth) until the pump has framed it. A segment's audio may come in parts (its
opening first, for a turn's first segment): the pump frames what has come and waits for the rest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rt_server.pipeline.jobs import (
    MS_PER_DURATION_FRAME,
    SOURCE_SAMPLE_RATE_HZ,
    SegmentAudio,
    SegmentOutcome,
)
from rt_server.protocol import ErrorCode, SegmentInfo

# The pump frames a segment in chunks of at least this many 24 kHz samples (20 ms), so a nearly full outbox
# does not cost one tiny resampler call per frame.
MIN_CHUNK_SAMPLES = 480


@dataclass
class SegmentTicket:
    seq: int
    phonemes: str
    audio: npt.NDArray[np.float32] | None = None  # received so far: all of it, or its opening
    durations: npt.NDArray[np.int64] | None = None
    total_samples: int = 0  # the whole segment's audio, once the first part is in
    failed: str | None = None
    announced: bool = False
    offset: int = 0  # samples of `audio` already handed to the output chain

    @property
    def remaining_samples(self) -> int:
        """Received and not yet handed on."""
        return 0 if self.audio is None else len(self.audio) - self.offset

    @property
    def complete(self) -> bool:
        """All of the segment's audio is in."""
        return self.audio is not None and len(self.audio) == self.total_samples

    def receive(self, part: SegmentAudio) -> None:
        """Add a part of the audio (the whole of it, or its opening, or what follows what is here)."""
        have = 0 if self.audio is None else len(self.audio)
        if part.offset > have:
            raise ValueError(f"segment {self.seq}: part at sample {part.offset} after only {have} received")
        new = part.audio[have - part.offset :]
        self.audio = new if self.audio is None else np.concatenate([self.audio, new])
        self.durations, self.total_samples = part.durations, part.total

    def take(self, room_ms: float) -> npt.NDArray[np.float32]:
        """The next chunk of audio: about `room_ms` of it, at least MIN_CHUNK_SAMPLES, at most what is
        left.
        """
        assert self.audio is not None
        n = max(MIN_CHUNK_SAMPLES, int(room_ms * SOURCE_SAMPLE_RATE_HZ / 1000.0))
        chunk = self.audio[self.offset : self.offset + n]
        self.offset += len(chunk)
        return chunk

    def alignment(self, start_ms: float) -> SegmentInfo:
        """The `segment` event: phoneme i spans token i + 1 (token 0 is the leading boundary)."""
        assert self.audio is not None
        assert self.durations is not None
        edges = start_ms + np.cumsum(self.durations) * MS_PER_DURATION_FRAME
        timings = tuple((float(edges[i]), float(edges[i + 1])) for i in range(len(self.phonemes)))
        return SegmentInfo(
            seq=self.seq,
            phonemes=self.phonemes,
            start_ms=start_ms,
            duration_ms=self.total_samples * 1000.0 / SOURCE_SAMPLE_RATE_HZ,
            timings=timings,
        )


@dataclass
class FlushTicket:
    flush_id: str | int | None


@dataclass
class CloseTicket:
    error: ErrorCode | None  # None: a client `close` (done, 1000); else the error to close with (shutdown)


Ticket = SegmentTicket | FlushTicket | CloseTicket


class Tickets:
    def __init__(self) -> None:
        self._queue: deque[Ticket] = deque()  # bound: the session's max_pending_tickets

    def append(self, ticket: Ticket) -> None:
        self._queue.append(ticket)

    def head(self) -> Ticket:
        return self._queue[0]

    def pop(self) -> Ticket:
        return self._queue.popleft()

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def resolve(self, outcome: SegmentOutcome) -> bool:
        """Attach an outcome (a failure, or audio: all of it or a part) to its segment ticket; False if there
        is none (cleared meanwhile)."""
        for ticket in self._queue:
            if isinstance(ticket, SegmentTicket) and ticket.seq == outcome.seq:
                if isinstance(outcome, SegmentAudio):
                    ticket.receive(outcome)
                else:
                    ticket.failed = outcome.message
                return True
        return False

    @property
    def pending_phonemes(self) -> int:
        """Phonemes of segments still waiting for synthesis."""
        return sum(
            len(t.phonemes)
            for t in self._queue
            if isinstance(t, SegmentTicket) and t.audio is None and t.failed is None
        )

    @property
    def unframed_ms(self) -> float:
        """Received audio not yet handed to the output chain."""
        samples = sum(t.remaining_samples for t in self._queue if isinstance(t, SegmentTicket))
        return samples * 1000.0 / SOURCE_SAMPLE_RATE_HZ
