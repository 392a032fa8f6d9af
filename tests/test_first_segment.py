"""The first-segment policy as a setting: on (the default) a turn's first segment is short; off, it is cut like
the rest (whole sentences), the baseline `rt-server bench` compares against. And the pause trimming that goes
with it: where a sentence is cut in the middle, and before a turn's first word, the model's boundary silence is
cut to `join_pause_ms`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import websockets
from server_harness import make_settings, receive_until_closed, start_server

from rt_server.app import session_config
from rt_server.settings import Settings

pytestmark = pytest.mark.timeout(120)

SENTENCE = "ðə kwˈɪk bɹˈWn fˈɑːks ʤˈʌmps ˌOvɚ ðə lˈAzi dˈɑːɡ."
LATER = "ɪt wʌzɐ bɹˈIt kˈOld dˈA ɪn ˈApɹəl."


def test_the_setting_reads_from_the_environment_and_reaches_the_sessions() -> None:
    assert Settings().short_first_segment
    settings = Settings.from_sources({"RT_SERVER_SHORT_FIRST_SEGMENT": "off"})
    assert not settings.short_first_segment
    assert not session_config(settings).short_first_segment


async def _stream(**settings: Any) -> tuple[list[dict[str, Any]], np.ndarray]:
    """SENTENCE and LATER streamed word by word, then `close`: the segment events and the f32 audio."""
    server = start_server(make_settings(first_segment_min_phonemes=8, **settings))
    try:
        async with websockets.connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "alignment": True, "encoding": "pcm_f32le"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for word in f"{SENTENCE} {LATER}".split():
                await ws.send(json.dumps({"type": "phonemes", "text": word + " "}))
            await ws.send(json.dumps({"type": "close"}))
            got = await receive_until_closed(ws)
    finally:
        await asyncio.to_thread(server.stop)
    assert got.close_code == 1000
    segments = [e for e in got.events if e["type"] == "segment"]
    return segments, np.frombuffer(b"".join(got.frames), "<f4")


async def _first_segments(short_first_segment: bool) -> list[str]:
    segments, _ = await _stream(short_first_segment=short_first_segment)
    return [s["phonemes"] for s in segments]


@pytest.mark.asyncio
async def test_short_first_segment_on_and_off() -> None:
    async with asyncio.timeout(100):
        assert await _first_segments(True) == ["ðə kwˈɪk", "bɹˈWn fˈɑːks ʤˈʌmps ˌOvɚ ðə lˈAzi dˈɑːɡ.", LATER]
        assert await _first_segments(False) == [SENTENCE, LATER]


def _pauses(segments: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(silence before the first phoneme, after the last one) per segment, from the alignment."""
    return [
        (s["timings"][0][0] - s["start_ms"], s["start_ms"] + s["duration_ms"] - s["timings"][-1][1]) for s in segments
    ]


@pytest.mark.asyncio
async def test_pauses_are_cut_before_the_first_word_and_where_a_sentence_is_cut() -> None:
    from rt_server.model.runner import SynthesisRequest, tiny_runner

    async with asyncio.timeout(100):
        trimmed, audio = await _stream(trim_pauses=True, join_pause_ms=50)
        natural, natural_audio = await _stream(trim_pauses=False)
    assert (
        [s["phonemes"] for s in trimmed]
        == [s["phonemes"] for s in natural]
        == [
            "ðə kwˈɪk",
            "bɹˈWn fˈɑːks ʤˈʌmps ˌOvɚ ðə lˈAzi dˈɑːɡ.",
            LATER,
        ]
    )
    cut, kept = _pauses(trimmed), _pauses(natural)
    assert all(before > 50 and after > 50 for before, after in kept)  # the tiny model's own pauses
    assert cut[0] == (50, 50)  # before the turn's first word; the sentence goes on after it
    assert cut[1] == (50, kept[1][1])  # continues a sentence; ends one (the model's pause stays)
    assert cut[2] == kept[2]  # a new sentence: the model's pauses
    # the audio is the model's output for each segment with its silence cut, and nothing else
    runner = tiny_runner(seed=0)
    caps = [(2, 2), (2, None), (None, None)]
    expected = [
        runner.synthesize([SynthesisRequest(s["phonemes"], "af_test", 1.0, None, lead, trail)])[0].audio
        for s, (lead, trail) in zip(trimmed, caps, strict=True)
    ]
    np.testing.assert_allclose(audio, np.concatenate(expected), atol=1e-6)
    removed_ms = sum(sum(natural) - sum(trimmed) for natural, trimmed in zip(kept, cut, strict=True))
    assert len(natural_audio) - len(audio) == round(removed_ms * 24)


def test_trimmed_audio_is_the_untrimmed_audio_with_silence_cut() -> None:
    """The model synthesises the full boundary and cuts it in the audio (capping the durations before the
    decoder garbled words; see `_trim_boundaries`). The cut here is within the generator's context
    (`GENERATOR_CONTEXT_FRAMES`; tests/test_model_stream.py covers longer cuts), so what is kept equals the
    untrimmed audio, but for a 5 ms fade at each cut."""
    from rt_server.model.runner import SynthesisRequest, tiny_runner

    runner = tiny_runner(seed=0)
    full = runner.synthesize([SynthesisRequest("ðə kwˈɪk", "af_test")])[0]
    cut = runner.synthesize([SynthesisRequest("ðə kwˈɪk", "af_test", max_lead_frames=2, max_trail_frames=3)])[0]
    lead, trail = int(full.durations[0]) - 2, int(full.durations[-1]) - 3
    assert lead > 0 and trail > 0
    assert list(cut.durations) == [2, *full.durations[1:-1], 3]
    assert len(cut.audio) == 600 * int(cut.durations.sum())
    inner = full.audio[600 * lead : len(full.audio) - 600 * trail]
    np.testing.assert_array_equal(cut.audio[120:-120], inner[120:-120])
    assert np.all(np.abs(cut.audio[:120]) <= np.abs(inner[:120]))  # faded in
    assert np.all(np.abs(cut.audio[-120:]) <= np.abs(inner[-120:]))  # faded out


def test_pause_settings_read_from_the_environment() -> None:
    assert session_config(Settings()).join_pause_frames == 2
    assert session_config(Settings.from_sources({"RT_SERVER_JOIN_PAUSE_MS": "100"})).join_pause_frames == 4
    assert session_config(Settings.from_sources({"RT_SERVER_TRIM_PAUSES": "off"})).join_pause_frames is None


@pytest.mark.asyncio
async def test_the_opening_of_a_turn_is_sent_before_its_segment_is_done() -> None:
    """`first_chunk_ms`: the first segment's opening reaches the client while the model is still on the rest
    (held there by fault injection), then the rest follows; what the client gets is the runner's streamed
    output, announced once with the whole segment's duration."""
    from fault_injection import Faults

    from rt_server.model.runner import SynthesisRequest, SynthesisResult, tiny_runner

    faults = Faults(hold_after_opening=True)
    # 450 ms = 18 frames, half of the segment's 36: the opening is those 18 frames whatever share of the segment
    # the server's runner picks at its measured speed (at most half; `ModelRunner.opening_share`)
    settings = make_settings(first_segment_min_phonemes=8, trim_pauses=True, first_chunk_ms=450)
    server = start_server(settings, loader=faults.loader)
    try:
        async with asyncio.timeout(60), websockets.connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "alignment": True, "encoding": "pcm_f32le"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for word in SENTENCE.split()[:2]:
                await ws.send(json.dumps({"type": "phonemes", "text": word + " "}))
            segment = json.loads(await ws.recv())
            assert segment["type"] == "segment" and segment["phonemes"] == "ðə kwˈɪk"
            opening = await ws.recv()
            assert isinstance(opening, bytes)
            assert faults.held.is_set()  # the engine is still inside the batch, after the opening
            faults.release()
            await ws.send(json.dumps({"type": "close"}))
            got = await receive_until_closed(ws)
    finally:
        faults.release()
        await asyncio.to_thread(server.stop)
    assert got.close_code == 1000
    assert [e["type"] for e in got.events] == ["done"]
    audio = np.frombuffer(opening + b"".join(got.frames), "<f4")

    runner = tiny_runner(seed=0)
    parts: list[SynthesisResult] = []
    request = SynthesisRequest("ðə kwˈɪk", "af_test", 1.0, None, 2, 2, first_chunk_frames=18)
    rest = runner.synthesize([request], lambda _, part: parts.append(part))[0]
    assert len(parts) == 1 and parts[0].offset == 0 and rest.offset == len(parts[0].audio) == 18 * 600
    assert rest.total_samples == 36 * 600
    np.testing.assert_allclose(audio, np.concatenate([parts[0].audio, rest.audio]), atol=1e-6)
    assert segment["duration_ms"] == len(audio) / 24


def test_first_chunk_setting() -> None:
    assert session_config(Settings()).first_chunk_frames == 10  # 250 ms
    assert session_config(Settings.from_sources({"RT_SERVER_FIRST_CHUNK_MS": "0"})).first_chunk_frames is None
    assert session_config(Settings(first_chunk_ms=60)).first_chunk_frames == 3  # whole frames, rounded up
    with pytest.raises(ValueError, match="first_chunk_ms must not be negative"):
        Settings(first_chunk_ms=-1)
