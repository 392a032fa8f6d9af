"""Framing: exact frame sizes, contiguous across pushes, nothing lost."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rt_server.pipeline.framing import Framer, frame_bytes_for


def test_frame_bytes_for_supported_rates() -> None:
    assert frame_bytes_for(frame_ms=20, sample_rate_hz=24000, bytes_per_sample=2) == 960
    assert frame_bytes_for(frame_ms=10, sample_rate_hz=8000, bytes_per_sample=1) == 80
    assert frame_bytes_for(frame_ms=200, sample_rate_hz=48000, bytes_per_sample=4) == 38400
    with pytest.raises(ValueError, match="whole number"):
        frame_bytes_for(frame_ms=1, sample_rate_hz=22050, bytes_per_sample=2)


def test_rejects_partial_samples() -> None:
    framer = Framer(8, 2)
    with pytest.raises(ValueError, match="whole samples"):
        framer.push(b"\x00")


@given(st.lists(st.binary(max_size=50).map(lambda b: b[: len(b) // 2 * 2]), max_size=30), st.integers(1, 12))
def test_framed_bytes_equal_pushed_bytes(chunks: list[bytes], samples_per_frame: int) -> None:
    frame_bytes = samples_per_frame * 2
    framer = Framer(frame_bytes, 2)
    frames: list[bytes] = []
    for chunk in chunks:
        frames.extend(framer.push(chunk))
        assert framer.pending_bytes < frame_bytes
    assert all(len(f) == frame_bytes for f in frames)
    last = framer.flush()
    if last is not None:
        assert 0 < len(last) < frame_bytes
        frames.append(last)
    assert b"".join(frames) == b"".join(chunks)
    assert framer.flush() is None


def test_reset_drops_pending() -> None:
    framer = Framer(4, 2)
    assert framer.push(b"abcdef") == [b"abcd"]
    framer.reset()
    assert framer.flush() is None
