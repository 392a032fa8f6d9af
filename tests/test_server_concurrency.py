"""Concurrent sessions on one server each receive exactly their own audio, in order: with noise off, each
session's PCM equals offline synthesis of its own segments (several voices, speeds and two models).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from server_harness import TINY, TINY2, RunningServer, make_settings, offline_audio, receive_until_closed, start_server

pytestmark = pytest.mark.timeout(180)

SESSIONS: list[dict[str, Any]] = [
    {"voice": "af_test", "text": ["həlˈoʊ wˈɜːld. ", "ðɪs ɪz ", "ə tˈɛst."]},
    {"voice": "am_test", "speed": 1.25, "text": ["wˈʌn tˈuː θɹˈiː. fˈɔːɹ ", "fˈaɪv sˈɪks."]},
    {"voice": "af_test:0.5,am_test:0.5", "text": ["sˈɛvən, ˈeɪt nˈaɪn. ", "tˈɛn."]},
    {"model": "tiny2", "voice": "am_test", "text": ["ə kwˈaɪət ", "mˈɔːɹnɪŋ. ", "jˈɛs."]},
]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server(make_settings(models=(TINY, TINY2), max_batch_size=4, batch_wait_ms=20))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def runners() -> dict[str, Any]:
    from rt_server.model.runner import tiny_runner

    return {"tiny": tiny_runner(seed=0), "tiny2": tiny_runner(seed=1)}


async def _session(server: RunningServer, spec: dict[str, Any]) -> tuple[list[str], np.ndarray, list[str]]:
    fields = {k: v for k, v in spec.items() if k != "text"}
    async with websockets.connect(server.url, compression=None) as ws:
        await ws.send(json.dumps({"type": "start", "encoding": "pcm_f32le", "alignment": True, **fields}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        for piece in spec["text"]:
            await ws.send(json.dumps({"type": "phonemes", "text": piece}))
            await asyncio.sleep(0.05)
        await ws.send(json.dumps({"type": "close"}))
        got = await receive_until_closed(ws)
    assert got.close_code == 1000
    assert got.types()[-1] == "done"
    segments = [e["phonemes"] for e in got.events if e["type"] == "segment"]
    return segments, np.frombuffer(b"".join(got.frames), "<f4"), got.types()


@pytest.mark.asyncio
async def test_concurrent_sessions_each_get_exactly_their_own_audio(
    server: RunningServer, runners: dict[str, Any]
) -> None:
    async with asyncio.timeout(150):
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(_session(server, spec)) for spec in SESSIONS]
    for spec, task in zip(SESSIONS, running, strict=True):
        segments, audio, types = task.result()
        # its own input, in order, nothing more
        assert " ".join(segments).split() == "".join(spec["text"]).split()
        assert all(t in ("segment", "done") for t in types)
        runner = runners[spec.get("model", "tiny")]
        expected = offline_audio(runner, segments, spec["voice"], spec.get("speed", 1.0))
        assert len(audio) == len(expected)
        # batched with other sessions' segments vs one at a time: equal to float32 rounding of the
        # batched forward
        np.testing.assert_allclose(audio, expected, atol=1e-3)
    state = await server.wait_for(lambda s: not s["sessions"])
    assert state["engines"]["tiny"]["open_sessions"] == 0
    assert state["engines"]["tiny2"]["open_sessions"] == 0
