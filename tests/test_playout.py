"""A session's playout with segments whose audio comes in parts (a turn's first segment): pure, no server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rt_server.pipeline.audio_out import AudioOutput
from rt_server.pipeline.jobs import SegmentAudio, SegmentFailed
from rt_server.pipeline.outbox import AudioFrame, Outbox, TextEvent
from rt_server.pipeline.playout import Playout
from rt_server.pipeline.tickets import FlushTicket, SegmentTicket

TOTAL = 600 * 10  # a 250 ms segment
DURATIONS = np.array([2, 3, 3, 2], dtype=np.int64)  # two phonemes and the boundaries: 10 frames


def _playout(max_buffer_ms: float = 2000.0) -> Playout:
    audio = AudioOutput(encoding="pcm_f32le", sample_rate_hz=24_000, frame_ms=20)
    return Playout(Outbox(max_control_events=8), audio, max_buffer_ms=max_buffer_ms, alignment=True, max_events=4)


def _part(offset: int, length: int, seq: int = 0) -> SegmentAudio:
    ramp = np.arange(TOTAL, dtype=np.float32) / TOTAL
    return SegmentAudio("s", seq, ramp[offset : offset + length], DURATIONS, offset, TOTAL)


def _drain(playout: Playout) -> tuple[np.ndarray, list[dict[str, object]]]:
    samples, events = [], []
    while playout.outbox.peek() is not None:
        item = playout.outbox.pop()
        if isinstance(item, AudioFrame):
            samples.append(np.frombuffer(item.data, dtype="<f4"))
        elif isinstance(item, TextEvent):
            events.append(json.loads(item.text))
    return (np.concatenate(samples) if samples else np.zeros(0, np.float32)), events


def test_the_opening_plays_while_the_rest_is_synthesised() -> None:
    playout = _playout()
    playout.add(SegmentTicket(0, "ab"))
    playout.add(FlushTicket("f1"))
    assert playout.resolve(_part(0, 2400))
    playout.pump()
    sent, events = _drain(playout)
    assert [e["type"] for e in events] == ["segment"]
    assert events[0]["duration_ms"] == 250.0  # the whole segment's, announced with its first audio
    assert 0 < len(sent) <= 2400  # framed what came; the framer holds back a partial frame
    assert len(playout) == 2  # the segment waits for its rest, and the flush behind it
    assert playout.pending_phonemes == 0  # synthesis has answered for these phonemes

    assert playout.resolve(_part(2400, TOTAL - 2400))
    playout.pump()
    rest, events = _drain(playout)
    assert [e["type"] for e in events] == ["flushed"]
    assert len(playout) == 0
    whole = np.concatenate([sent, rest])
    np.testing.assert_array_equal(whole, np.arange(TOTAL, dtype=np.float32) / TOTAL)


def test_a_repeated_part_is_not_played_twice() -> None:
    playout = _playout()
    playout.add(SegmentTicket(0, "ab"))
    playout.resolve(_part(0, 2400))
    playout.resolve(_part(1200, TOTAL - 1200))  # overlaps what came
    playout.add(FlushTicket(None))
    playout.pump()
    sent, _ = _drain(playout)
    np.testing.assert_array_equal(sent, np.arange(TOTAL, dtype=np.float32) / TOTAL)


def test_a_gap_is_a_bug_not_silence() -> None:
    ticket = SegmentTicket(0, "ab")
    ticket.receive(_part(0, 1200))
    with pytest.raises(ValueError, match="after only 1200 received"):
        ticket.receive(_part(2400, TOTAL - 2400))


def test_a_segment_that_fails_after_its_opening_reports_the_failure() -> None:
    playout = _playout()
    playout.add(SegmentTicket(0, "ab"))
    playout.add(SegmentTicket(1, "cd"))
    playout.resolve(_part(0, 2400))
    playout.pump()
    playout.resolve(SegmentFailed("s", 0, "synthesis failed"))
    failures = playout.pump()
    assert [f.message for f in failures] == ["segment 0: synthesis failed"]
    assert len(playout) == 1  # the next segment is still served


def test_parts_must_lie_within_the_segment() -> None:
    with pytest.raises(ValueError, match="outside a segment"):
        SegmentAudio("s", 0, np.zeros(10, np.float32), DURATIONS, TOTAL - 5, TOTAL)
    assert SegmentAudio("s", 0, np.zeros(0, np.float32), DURATIONS, TOTAL, TOTAL).final
    assert not _part(0, 10).final and _part(TOTAL - 10, 10).final


def test_events_beyond_the_ordered_streams_bound_wait_as_tickets() -> None:
    audio = AudioOutput(encoding="pcm_f32le", sample_rate_hz=24_000, frame_ms=20)
    playout = Playout(Outbox(max_control_events=8), audio, max_buffer_ms=2000.0, alignment=True, max_events=2)
    for n in range(5):
        playout.add(FlushTicket(f"f{n}"))
    playout.pump()
    assert (playout.outbox.ordered_events, len(playout)) == (2, 3)
    first = playout.outbox.pop()
    assert isinstance(first, TextEvent) and json.loads(first.text)["id"] == "f0"
    playout.pump()  # the writer took one: one more comes out of the tickets, in order
    _, events = _drain(playout)
    assert [e["id"] for e in events] == ["f1", "f2"]
    playout.pump()
    _, events = _drain(playout)
    assert [e["id"] for e in events] == ["f3", "f4"] and len(playout) == 0
