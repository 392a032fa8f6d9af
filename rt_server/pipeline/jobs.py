"""The plain data that crosses between sessions (event loop) and an engine (its thread)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

BOUNDARY_TOKENS = 2  # Kokoro wraps every input in two 0-tokens
SOURCE_SAMPLE_RATE_HZ = 24_000  # Kokoro's output rate
SAMPLES_PER_DURATION_FRAME = 600  # one predicted duration frame: 25 ms at 24 kHz
MS_PER_DURATION_FRAME = SAMPLES_PER_DURATION_FRAME * 1000.0 / SOURCE_SAMPLE_RATE_HZ


@dataclass(frozen=True)
class SegmentJob:
    """One segment to synthesise; `phonemes` is validated, normalised and at most the model's limit."""

    session_id: str
    seq: int
    phonemes: str
    voice: str
    speed: float
    first_in_turn: bool
    submitted_at: float
    # Caps on the boundary silences (frames) where the segment joins a neighbour mid-sentence or starts a
    # turn; None: the model's own pause.
    max_lead_frames: int | None = None
    max_trail_frames: int | None = None
    # Deliver the opening of the audio (at least this many frames) as soon as it is ready, ahead of the rest
    # (a turn's first segment); None: the whole segment at once.
    first_chunk_frames: int | None = None

    @property
    def tokens(self) -> int:
        return len(self.phonemes) + BOUNDARY_TOKENS


@dataclass(frozen=True)
class SegmentAudio:
    """A synthesised segment, or a part of one: float32 mono at 24 kHz and the predicted frames per token
    (boundaries included; the whole segment's, in every part).

    `audio` is samples [offset, offset + len(audio)) of the segment's `total_samples` (None: the whole segment,
    `offset` 0). A segment delivered in parts (`SegmentJob.first_chunk_frames`) comes as its opening, then the
    rest; a part may repeat samples already delivered (after a batch was retried), which the session skips.
    """

    session_id: str
    seq: int
    audio: npt.NDArray[np.float32]
    durations: npt.NDArray[np.int64]
    offset: int = 0
    total_samples: int | None = None

    def __post_init__(self) -> None:
        total = len(self.audio) if self.total_samples is None else self.total_samples
        if not 0 <= self.offset <= self.offset + len(self.audio) <= total:
            raise ValueError(f"samples [{self.offset}, +{len(self.audio)}) outside a segment of {total}")

    @property
    def total(self) -> int:
        """The whole segment's samples."""
        return len(self.audio) if self.total_samples is None else self.total_samples

    @property
    def final(self) -> bool:
        """This part reaches the segment's end."""
        return self.offset + len(self.audio) == self.total

    @property
    def duration_ms(self) -> float:
        """This part's audio."""
        return len(self.audio) * 1000.0 / SOURCE_SAMPLE_RATE_HZ

    @property
    def total_ms(self) -> float:
        return self.total * 1000.0 / SOURCE_SAMPLE_RATE_HZ


@dataclass(frozen=True)
class SegmentFailed:
    """The batch holding this segment failed; `message` is safe to show to the client."""

    session_id: str
    seq: int
    message: str


@dataclass(frozen=True)
class EngineFailed:
    """The engine's thread died: none of this session's segments will come. The session fails (`internal`)."""

    session_id: str


SegmentOutcome = SegmentAudio | SegmentFailed
Delivery = SegmentOutcome | EngineFailed  # what an engine hands a session
