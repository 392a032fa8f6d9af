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

    @property
    def tokens(self) -> int:
        return len(self.phonemes) + BOUNDARY_TOKENS


@dataclass(frozen=True)
class SegmentAudio:
    """A synthesised segment: float32 mono at 24 kHz and the predicted frames per token (boundaries
    included).
    """

    session_id: str
    seq: int
    audio: npt.NDArray[np.float32]
    durations: npt.NDArray[np.int64]

    @property
    def duration_ms(self) -> float:
        return len(self.audio) * 1000.0 / SOURCE_SAMPLE_RATE_HZ


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
