"""A whole session against a real uvicorn server and real WebSocket clients: events, frames, flush, clear,
idle cut, encodings and rates, invalid input, HTTP endpoints.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from scipy.signal import resample_poly
from server_harness import (
    BROKEN_VOICE,
    POISON,
    TINY,
    TINY2,
    RunningServer,
    make_settings,
    offline_audio,
    poisoned_loader,
    receive_until_closed,
    start_server,
)

from rt_server.pipeline.audio_encoding import BYTES_PER_SAMPLE, decode, encode

pytestmark = pytest.mark.timeout(120)

HELLO = "həlˈoʊ wˈɜːld."
TEST = "ðɪs ɪz ə tˈɛst."
MORE = ["wˈʌn tˈuː θɹˈiː.", "fˈɔːɹ fˈaɪv sˈɪks.", "sˈɛvən ˈeɪt nˈaɪn.", "tˈɛn ɪlˈɛvən."]
LSB = 1 / 32767


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    # The real tiny models, wrapped so that a batch holding POISON raises (test_a_failing_batch_...).
    running = start_server(
        loader=poisoned_loader,
        settings=make_settings(
            models=(TINY, TINY2),
            start_timeout_s=3.0,
            idle_cut_ms=300,
            max_pending_phonemes=400,
            max_message_bytes=4096,
        ),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def runner() -> Any:
    from rt_server.model.runner import tiny_runner

    return tiny_runner(seed=0)


async def _start(server: RunningServer, **fields: Any) -> tuple[Any, dict[str, Any]]:
    ws = await websockets.connect(server.url, compression=None)
    await ws.send(json.dumps({"type": "start", **fields}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws, ready


def _s16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float32) / 32767


@pytest.mark.asyncio
async def test_whole_session(server: RunningServer, runner: Any) -> None:
    async with asyncio.timeout(60):
        ws, ready = await _start(server, alignment=True)
        assert ready["settings"]["model"] == "tiny"
        assert ready["settings"]["voice"] == "af_test"
        assert ready["settings"]["encoding"] == "pcm_s16le"
        assert ready["settings"]["sample_rate"] == 24000
        assert ready["settings"]["frame_ms"] == 20
        assert ready["limits"]["max_segment_phonemes"] == 510
        assert ready["limits"]["max_pending_phonemes"] == 400
        await ws.send(json.dumps({"type": "phonemes", "text": f"{HELLO} {TEST} "}))
        await ws.send(json.dumps({"type": "close"}))
        got = await receive_until_closed(ws)
    assert got.close_code == 1000
    assert got.types() == ["segment", "segment", "done"]
    segments = got.events[:2]
    assert [s["phonemes"] for s in segments] == [HELLO, TEST]
    assert [s["seq"] for s in segments] == [0, 1]
    # each segment event comes before the frame holding its first sample, at its start in the timeline
    # (48 bytes per ms; a frame may hold the end of one segment and the start of the next)
    sent = 0
    for item in got.items:
        if isinstance(item, bytes):
            sent += len(item)
        elif item["type"] == "segment":
            assert sent <= round(item["start_ms"] * 48) < sent + 960
            timings = item["timings"]
            assert len(timings) == len(item["phonemes"])
            assert all(a < b for a, b in timings)
            assert all(b1 == a2 for (_, b1), (a2, _) in itertools.pairwise(timings))
            assert item["start_ms"] < timings[0][0] < timings[-1][1] < item["start_ms"] + item["duration_ms"]
    # frames of exactly 20 ms, the last one before `done` possibly shorter
    assert all(len(f) == 960 for f in got.frames[:-1])
    assert 0 < len(got.frames[-1]) <= 960
    pcm = _s16(b"".join(got.frames))
    expected = offline_audio(runner, [HELLO, TEST], "af_test")
    assert len(pcm) == len(expected) == round(sum(s["duration_ms"] for s in segments) * 24)
    np.testing.assert_allclose(pcm, np.clip(expected, -1, 1), atol=3 * LSB)


@pytest.mark.asyncio
async def test_flush_answers_after_its_last_frame_and_the_session_goes_on(server: RunningServer, runner: Any) -> None:
    async with asyncio.timeout(60):
        ws, _ = await _start(server, voice="am_test", frame_ms=50)
        await ws.send(json.dumps({"type": "phonemes", "text": "həlˈoʊ wˈɜːld"}))
        await ws.send(json.dumps({"type": "flush", "id": "a"}))
        first = await receive_until_closed(ws, stop_after="flushed")
        await ws.send(json.dumps({"type": "phonemes", "text": "ðɪs ɪz "}))
        await ws.send(json.dumps({"type": "phonemes", "text": "ə tˈɛst"}))
        await ws.send(json.dumps({"type": "flush", "id": 2}))
        await ws.send(json.dumps({"type": "flush", "id": 3}))  # nothing pending: answered at once, in order
        second = await receive_until_closed(ws, stop_after="flushed")
        third = await receive_until_closed(ws, stop_after="flushed")
        await ws.send(json.dumps({"type": "close"}))
        rest = await receive_until_closed(ws)
    assert first.events == [{"type": "flushed", "id": "a"}]
    assert second.events == [{"type": "flushed", "id": 2}]
    assert third.items == [{"type": "flushed", "id": 3}]
    assert rest.items == [{"type": "done"}]
    assert rest.close_code == 1000
    for part, phonemes in ((first, ["həlˈoʊ wˈɜːld"]), (second, ["ðɪs ɪz ə tˈɛst"])):
        assert all(len(f) == 2400 for f in part.frames[:-1])
        pcm = _s16(b"".join(part.frames))
        np.testing.assert_allclose(pcm, np.clip(offline_audio(runner, phonemes, "am_test"), -1, 1), atol=3 * LSB)


@pytest.mark.asyncio
async def test_clear_drops_pending_work_and_no_stale_audio_follows_cleared(server: RunningServer, runner: Any) -> None:
    async with asyncio.timeout(60):
        ws, _ = await _start(server, alignment=True)
        await ws.send(json.dumps({"type": "phonemes", "text": " ".join(MORE)}))
        await ws.send(json.dumps({"type": "flush", "id": "old"}))
        while not isinstance(await ws.recv(), bytes):
            pass  # wait until audio is streaming
        await ws.send(json.dumps({"type": "clear"}))
        before = await receive_until_closed(ws, stop_after="cleared")
        await ws.send(json.dumps({"type": "phonemes", "text": HELLO}))
        await ws.send(json.dumps({"type": "flush", "id": "new"}))
        after = await receive_until_closed(ws, stop_after="flushed")
        await ws.send(json.dumps({"type": "close"}))
        await receive_until_closed(ws)
    assert before.types()[-1] == "cleared"
    assert "flushed" not in before.types()  # a clear cancels pending flushes
    assert after.types() == ["segment", "flushed"]
    assert after.events[-1] == {"type": "flushed", "id": "new"}
    assert after.events[0]["phonemes"] == HELLO
    assert isinstance(after.items[0], dict)  # the new segment's event precedes any audio
    pcm = _s16(b"".join(after.frames))
    np.testing.assert_allclose(pcm, np.clip(offline_audio(runner, [HELLO], "af_test"), -1, 1), atol=3 * LSB)
    # the timeline resumes where the audio actually sent before the clear ended
    sent_before_ms = sum(len(f) for f in before.frames) / 48 + 20  # + the frame that triggered the clear
    assert after.events[0]["start_ms"] == pytest.approx(sent_before_ms)


@pytest.mark.asyncio
async def test_idle_timeout_cuts_text_without_a_flush(server: RunningServer, runner: Any) -> None:
    async with asyncio.timeout(60):
        ws, _ = await _start(server)
        await ws.send(json.dumps({"type": "phonemes", "text": "həlˈoʊ wˈɜːld"}))  # no punctuation, no flush
        expected = offline_audio(runner, ["həlˈoʊ wˈɜːld"], "af_test")
        full_frames = len(expected) // 480
        frames = [await ws.recv() for _ in range(full_frames)]
        assert all(isinstance(f, bytes) and len(f) == 960 for f in frames)
        await ws.send(json.dumps({"type": "close"}))
        rest = await receive_until_closed(ws)
    assert rest.types() == ["done"]
    pcm = _s16(b"".join(frames) + b"".join(rest.frames))
    np.testing.assert_allclose(pcm, np.clip(expected, -1, 1), atol=3 * LSB)


@pytest.mark.parametrize(("rate", "encoding"), [(16000, "mulaw"), (8000, "pcm_s16le"), (48000, "pcm_f32le")])
@pytest.mark.asyncio
async def test_resampled_encodings(server: RunningServer, runner: Any, rate: int, encoding: str) -> None:
    async with asyncio.timeout(60):
        ws, ready = await _start(server, sample_rate=rate, encoding=encoding, frame_ms=40)
        assert (ready["settings"]["sample_rate"], ready["settings"]["encoding"]) == (rate, encoding)
        await ws.send(json.dumps({"type": "phonemes", "text": f"{HELLO} {TEST}"}))
        await ws.send(json.dumps({"type": "flush"}))
        got = await receive_until_closed(ws, stop_after="flushed")
        await ws.close()
    frame_bytes = 40 * rate // 1000 * BYTES_PER_SAMPLE[encoding]  # type: ignore[index]
    assert all(len(f) == frame_bytes for f in got.frames[:-1])
    audio = decode(b"".join(got.frames), encoding)  # type: ignore[arg-type]
    source = offline_audio(runner, [HELLO, TEST], "af_test").astype(np.float64)
    reference = resample_poly(source, rate, 24000).astype(np.float32)  # the whole turn in one go
    assert len(audio) == len(reference)
    expected = decode(encode(reference, encoding), encoding)  # type: ignore[arg-type]
    tolerance = {"mulaw": 0.01, "pcm_s16le": 3 * LSB, "pcm_f32le": 1e-4}[encoding]
    np.testing.assert_allclose(audio, expected, atol=tolerance)


FATAL = [
    ("binary frame", b"\x00\x01", "binary_frame", 1003),
    ("malformed json", "{", "invalid_json", 1007),
    ("not an object", "[]", "invalid_message", 1007),
    ("unknown type", '{"type":"speak"}', "invalid_message", 1007),
    ("not start first", '{"type":"phonemes","text":"a"}', "start_required", 1008),
    ("bad start value", '{"type":"start","speed":9}', "invalid_start", 1008),
    ("unknown voice", '{"type":"start","voice":"nobody"}', "unknown_voice", 1008),
    ("unknown model", '{"type":"start","model":"nope"}', "unknown_model", 1008),
    ("too large", json.dumps({"type": "start", "voice": "x" * 5000}), "message_too_large", 1009),
]


@pytest.mark.parametrize(("case", "message", "code", "close_code"), FATAL, ids=[f[0] for f in FATAL])
@pytest.mark.asyncio
async def test_invalid_input_gets_its_error_then_close_code(
    server: RunningServer, case: str, message: str | bytes, code: str, close_code: int
) -> None:
    async with asyncio.timeout(30):
        ws = await websockets.connect(server.url, compression=None)
        await ws.send(message)
        got = await receive_until_closed(ws)
    assert got.events[-1]["type"] == "error"
    assert got.events[-1]["code"] == code
    assert got.events[-1]["close_code"] == close_code
    assert got.close_code == close_code
    assert got.close_reason == code


@pytest.mark.asyncio
async def test_fatal_errors_after_start(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        for message, code, close_code in (
            (b"\x00", "binary_frame", 1003),
            ("{]", "invalid_json", 1007),
            (json.dumps({"type": "phonemes", "text": "a " * 2100}), "message_too_large", 1009),
        ):
            ws, _ = await _start(server)
            await ws.send(message)
            got = await receive_until_closed(ws)
            assert (got.events[-1]["code"], got.close_code, got.close_reason) == (code, close_code, code)


@pytest.mark.asyncio
async def test_rejected_messages_leave_the_session_going(server: RunningServer, runner: Any) -> None:
    async with asyncio.timeout(60):
        ws, _ = await _start(server)
        bad = [
            ({"type": "phonemes", "text": "hɛlo 1ɛ2 33"}, "unknown_symbols"),
            ({"type": "phonemes", "text": 5}, "invalid_field"),
            ({"type": "phonemes", "text": "a" * 511}, "word_too_long"),
            ({"type": "phonemes", "text": "ab " * 134}, "input_overflow"),
            ({"type": "flush", "id": [1]}, "invalid_field"),
            ({"type": "start"}, "already_started"),
            ({"type": "phonemes", "text": "ab \ud800"}, "unknown_symbols"),  # a lone surrogate, echoed safely
        ]
        for message, _ in bad:
            await ws.send(json.dumps(message))
        errors = [json.loads(await ws.recv()) for _ in bad]
        await ws.send(json.dumps({"type": "phonemes", "text": HELLO}))
        await ws.send(json.dumps({"type": "close"}))
        got = await receive_until_closed(ws)
    assert [e["code"] for e in errors] == [code for _, code in bad]
    assert all(e["type"] == "error" and "close_code" not in e for e in errors)
    assert errors[0]["symbols"] == ["1", "2", "3"]
    assert got.types() == ["done"]
    assert got.close_code == 1000
    pcm = _s16(b"".join(got.frames))  # only the accepted text was synthesised
    np.testing.assert_allclose(pcm, np.clip(offline_audio(runner, [HELLO], "af_test"), -1, 1), atol=3 * LSB)
    status, _ = await asyncio.to_thread(server.get, "/readyz")
    assert status == 200


@pytest.mark.asyncio
async def test_start_timeout(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        ws = await websockets.connect(server.url, compression=None)
        got = await receive_until_closed(ws)
    assert got.events == [
        {"type": "error", "code": "start_timeout", "message": "no `start` within 3.0 s", "close_code": 1008}
    ]
    assert got.close_code == 1008


@pytest.mark.asyncio
async def test_http_endpoints(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        ws, _ = await _start(server)  # one session, so the batch and latency histograms have data
        await ws.send(json.dumps({"type": "phonemes", "text": HELLO}))
        await ws.send(json.dumps({"type": "close"}))
        await receive_until_closed(ws)
        health = await asyncio.to_thread(server.get, "/healthz")
        ready = await asyncio.to_thread(server.get, "/readyz")
        voices = await asyncio.to_thread(server.get, "/v1/voices?model=tiny2")
        missing = await asyncio.to_thread(server.get, "/v1/voices?model=nope")
        models = await asyncio.to_thread(server.get, "/v1/models")
        metrics = await asyncio.to_thread(server.get, "/metrics")
    assert health == (200, '{"status":"ok"}')
    assert ready[0] == 200
    assert json.loads(ready[1]) == {"ready": True, "models": {"tiny": True, "tiny2": True}}
    assert json.loads(voices[1]) == {"model": "tiny2", "voices": ["af_test", "am_test"]}
    assert missing[0] == 404
    listed = json.loads(models[1])
    assert listed["default"] == "tiny"
    assert [m["name"] for m in listed["models"]] == ["tiny", "tiny2"]
    assert listed["models"][0] | {"voices": 2} == {
        "name": "tiny",
        "ready": True,
        "sample_rate": 24000,
        "max_phonemes": 510,
        "voices": 2,
    }
    status, text = metrics
    assert status == 200
    for name in (
        "rt_sessions_active",
        "rt_queue_depth",
        "rt_batch_size_bucket",
        "rt_time_to_first_audio_seconds_bucket",
        "rt_real_time_factor_bucket",
        "rt_session_buffer_max_ms",
        "rt_errors_total",
        "rt_event_loop_tasks",
    ):
        assert name in text, name


@pytest.mark.asyncio
async def test_a_failing_batch_fails_only_its_segments_and_the_server_goes_on(
    server: RunningServer, runner: Any
) -> None:
    async with asyncio.timeout(60):
        ws, _ = await _start(server, alignment=True)
        await ws.send(json.dumps({"type": "phonemes", "text": f"{HELLO} {POISON} {POISON}. {TEST}"}))
        await ws.send(json.dumps({"type": "flush", "id": 1}))
        got = await receive_until_closed(ws, stop_after="flushed")
        # the server goes on: the same session, and another one
        other, _ = await _start(server, voice="am_test")
        await other.send(json.dumps({"type": "phonemes", "text": TEST}))
        await other.send(json.dumps({"type": "close"}))
        other_got = await receive_until_closed(other)
        await ws.send(json.dumps({"type": "phonemes", "text": HELLO}))
        await ws.send(json.dumps({"type": "close"}))
        rest = await receive_until_closed(ws)
    failed = [e for e in got.events if e["type"] == "error"]
    assert [e["code"] for e in failed] == ["synthesis_failed"]
    assert "close_code" not in failed[0]
    assert [e["phonemes"] for e in got.events if e["type"] == "segment"] == [HELLO, TEST]
    pcm = _s16(b"".join(got.frames))
    np.testing.assert_allclose(pcm, np.clip(offline_audio(runner, [HELLO, TEST], "af_test"), -1, 1), atol=3 * LSB)
    assert other_got.close_code == 1000
    other_pcm = _s16(b"".join(other_got.frames))
    np.testing.assert_allclose(other_pcm, np.clip(offline_audio(runner, [TEST], "am_test"), -1, 1), atol=3 * LSB)
    assert rest.types() == ["segment", "done"]
    assert rest.close_code == 1000
    _, metrics = await asyncio.to_thread(server.get, "/metrics")
    assert 'rt_batch_failures_total{model="tiny"}' in metrics


@pytest.mark.asyncio
async def test_realtime_pace_releases_audio_at_most_lead_ms_ahead(server: RunningServer) -> None:
    lead_ms, frame_ms = 200, 20
    async with asyncio.timeout(60):
        ws, ready = await _start(server, pace="realtime", lead_ms=lead_ms, frame_ms=frame_ms)
        assert (ready["settings"]["pace"], ready["settings"]["lead_ms"]) == ("realtime", lead_ms)
        await ws.send(json.dumps({"type": "phonemes", "text": f"{HELLO} {TEST}"}))
        await ws.send(json.dumps({"type": "close"}))
        loop = asyncio.get_running_loop()
        first_at: float | None = None
        received_ms = 0.0
        worst_lead_ms = 0.0
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                assert json.loads(message)["type"] == "done"
                break
            now = loop.time()
            first_at = now if first_at is None else first_at
            received_ms += len(message) / 48
            # audio received beyond what real time has played since the first frame
            worst_lead_ms = max(worst_lead_ms, received_ms - (now - first_at) * 1000)
        await receive_until_closed(ws)
    assert received_ms > 3000
    # never more than lead_ms ahead, plus the frame in flight and 50 ms for a late first read on this side
    # (a slow server only makes it smaller); without pacing all 3.3 s would arrive at once
    assert worst_lead_ms <= lead_ms + frame_ms + 50


@pytest.mark.asyncio
async def test_per_message_deflate_is_not_negotiated(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        ws = await websockets.connect(server.url)  # offers permessage-deflate by default
        try:
            assert ws.response is not None
            assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        finally:
            await ws.close()


@pytest.mark.asyncio
async def test_a_websocket_to_another_path_is_refused_and_the_server_goes_on(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(server.url.replace("/v1/stream", "/v1/nope"))
        assert info.value.response.status_code == 403
        status, _ = await asyncio.to_thread(server.get, "/healthz")
        assert status == 200


@pytest.mark.asyncio
async def test_an_internal_fault_closes_with_1011_and_no_reason(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        ws = await websockets.connect(server.url, compression=None)
        await ws.send(json.dumps({"type": "start", "voice": BROKEN_VOICE}))
        got = await receive_until_closed(ws)
        status, _ = await asyncio.to_thread(server.get, "/readyz")
    assert got.events == [{"type": "error", "code": "internal", "message": "internal server error", "close_code": 1011}]
    assert got.close_code == 1011
    assert got.close_reason == ""
    assert status == 200
