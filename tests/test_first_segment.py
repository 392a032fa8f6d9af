"""The first-segment policy as a setting: on (the default) a turn's first segment is short; off, it is cut like
the rest (whole sentences), the baseline `rt-server bench` compares against.
"""

from __future__ import annotations

import asyncio
import json

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


async def _first_segments(short_first_segment: bool) -> list[str]:
    server = start_server(make_settings(first_segment_min_phonemes=8, short_first_segment=short_first_segment))
    try:
        async with websockets.connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "alignment": True}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for word in f"{SENTENCE} {LATER}".split():
                await ws.send(json.dumps({"type": "phonemes", "text": word + " "}))
            await ws.send(json.dumps({"type": "close"}))
            got = await receive_until_closed(ws)
    finally:
        await asyncio.to_thread(server.stop)
    assert got.close_code == 1000
    return [e["phonemes"] for e in got.events if e["type"] == "segment"]


@pytest.mark.asyncio
async def test_short_first_segment_on_and_off() -> None:
    async with asyncio.timeout(100):
        assert await _first_segments(True) == ["ðə kwˈɪk", "bɹˈWn fˈɑːks ʤˈʌmps ˌOvɚ ðə lˈAzi dˈɑːɡ.", LATER]
        assert await _first_segments(False) == [SENTENCE, LATER]
