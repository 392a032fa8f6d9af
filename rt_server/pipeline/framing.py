"""Cut a stream of encoded audio bytes into frames of exactly `frame_ms`.

Frames are contiguous across pushes (and so across segments): bytes that do not fill a frame wait for the next
push. `flush` returns the shorter last frame, at the end of a turn (`flushed`) or of the session (`done`).
Concatenating every frame returned gives back exactly the bytes pushed.
"""

from __future__ import annotations


def frame_bytes_for(*, frame_ms: int, sample_rate_hz: int, bytes_per_sample: int) -> int:
    """Bytes in one full frame. Every supported rate has a whole number of samples per millisecond."""
    samples, remainder = divmod(frame_ms * sample_rate_hz, 1000)
    if remainder:
        raise ValueError(f"{frame_ms} ms is not a whole number of samples at {sample_rate_hz} Hz")
    return samples * bytes_per_sample


class Framer:
    """Accumulate bytes and hand out full frames. Holds less than one frame between calls."""

    def __init__(self, frame_bytes: int, bytes_per_sample: int) -> None:
        if frame_bytes <= 0 or frame_bytes % bytes_per_sample:
            raise ValueError("a frame must hold a positive whole number of samples")
        self.frame_bytes = frame_bytes
        self.bytes_per_sample = bytes_per_sample
        self._pending = bytearray()  # bound: < frame_bytes (at most 200 ms * 48 kHz * 4 B = 38400 B)

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def push(self, data: bytes) -> list[bytes]:
        """Append encoded samples; returns the full frames now available, in order."""
        if len(data) % self.bytes_per_sample:
            raise ValueError("pushed data must hold whole samples")
        self._pending += data
        usable = len(self._pending) - len(self._pending) % self.frame_bytes
        frames = [bytes(self._pending[i : i + self.frame_bytes]) for i in range(0, usable, self.frame_bytes)]
        del self._pending[:usable]
        return frames

    def flush(self) -> bytes | None:
        """The shorter last frame, or None when nothing is pending."""
        if not self._pending:
            return None
        last = bytes(self._pending)
        self._pending.clear()
        return last

    def reset(self) -> None:
        """Drop pending bytes (on `clear`)."""
        self._pending.clear()
