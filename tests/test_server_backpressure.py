"""Backpressure and resource bounds on a real server: a slow reader stays within its buffer bound while others
keep going; a stalled reader is closed; a disconnect frees its work and tasks; capacity; graceful shutdown.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from server_harness import RunningServer, make_settings, receive_until_closed, start_server

pytestmark = pytest.mark.timeout(120)

SENTENCES = ["wˈʌn tˈuː θɹˈiː.", "fˈɔːɹ fˈaɪv sˈɪks.", "sˈɛvən ˈeɪt nˈaɪn.", "tˈɛn ɪlˈɛvən."]
LONG_TEXT = " ".join(SENTENCES * 3)
MAX_BUFFER_MS = 600
FRAME_MS = 20
# One segment here is at most ~20 phonemes of about 100 ms each in the tiny model.
MAX_SEGMENT_MS = 2500


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = make_settings(
        max_buffer_ms=MAX_BUFFER_MS,
        buffer_low_water_ms=300,
        stall_timeout_s=2.0,
        max_sessions=3,
        max_batch_size=1,  # one segment per step: the slow reader cannot hide behind a batch
    )
    running = start_server(settings, sndbuf_bytes=4096)
    yield running
    running.stop()


def _small_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer, so not reading pushes back on the server quickly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _connect(server: RunningServer, *, small: bool = False, **fields: Any) -> Any:
    extra: dict[str, Any] = {"sock": _small_socket(server.port), "max_queue": 2} if small else {}
    ws = await websockets.connect(server.url, compression=None, **extra)
    await ws.send(json.dumps({"type": "start", "frame_ms": FRAME_MS, **fields}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws


@pytest.mark.asyncio
async def test_slow_reader_stays_within_its_bound_while_another_session_finishes(server: RunningServer) -> None:
    slow = await _connect(server, small=True)
    try:
        await _slow_reader_scenario(server, slow)
    finally:
        slow.transport.abort()
    await server.wait_for(lambda s: not s["sessions"] and s["engines"]["tiny"]["queue_depth"] == 0)


async def _slow_reader_scenario(server: RunningServer, slow: Any) -> None:
    async with asyncio.timeout(100):
        await slow.send(json.dumps({"type": "phonemes", "text": LONG_TEXT}))
        await slow.send(json.dumps({"type": "flush", "id": "end"}))
        slow_frames = 0
        observed: list[dict[str, Any]] = []

        async def read_slowly() -> None:
            nonlocal slow_frames
            while True:
                if isinstance(await slow.recv(), bytes):
                    slow_frames += 1
                await asyncio.sleep(0.1)  # 20 ms of audio every 100 ms: a fifth of real time

        async def watch() -> None:
            while True:
                state = await asyncio.to_thread(server.state)
                observed.extend(s for s in state["sessions"].values() if s["state"] == "streaming")
                await asyncio.sleep(0.05)

        async with asyncio.TaskGroup() as tasks:
            reader = tasks.create_task(read_slowly())
            watcher = tasks.create_task(watch())
            await asyncio.sleep(1.0)  # let the slow session fill its buffer
            fast = await _connect(server)
            await fast.send(json.dumps({"type": "phonemes", "text": " ".join(SENTENCES[:2])}))
            await fast.send(json.dumps({"type": "close"}))
            fast_got = await receive_until_closed(fast)
            frames_when_fast_done = slow_frames
            await asyncio.sleep(2.0)  # the slow session keeps being throttled meanwhile
            state = await asyncio.to_thread(server.state)
            watcher.cancel()
            reader.cancel()
    assert fast_got.close_code == 1000
    assert fast_got.types()[-1] == "done"
    total_frames = 13_000 // FRAME_MS  # LONG_TEXT is well over 13 s of audio
    assert frames_when_fast_done < total_frames // 2, "the fast session finished while the slow one lagged"
    # the slow session's work is held back by the scheduler, not synthesised into an ever-growing buffer:
    # framed audio stays within max_buffer_ms (+ a frame), and all audio received from the engine but not yet
    # sent within that plus one segment waiting to be framed
    assert max(s["buffered_ms"] for s in observed) >= MAX_BUFFER_MS / 2, "the bound was actually exercised"
    assert all(s["buffered_ms"] <= MAX_BUFFER_MS + FRAME_MS for s in observed)
    assert all(s["unsent_ms"] <= MAX_BUFFER_MS + FRAME_MS + MAX_SEGMENT_MS for s in observed)
    assert len(state["sessions"]) == 1, "the slow reader is slow, not stalled: it is still served"


@pytest.mark.asyncio
async def test_a_client_that_stops_reading_is_closed(server: RunningServer) -> None:
    ws = await _connect(server, small=True)
    try:
        async with asyncio.timeout(60):
            await ws.send(json.dumps({"type": "phonemes", "text": LONG_TEXT}))
            await ws.send(json.dumps({"type": "flush"}))
            await server.wait_for(lambda s: len(s["sessions"]) == 1)
            # never read again: after stall_timeout_s with a blocked send the server gives the session up
            await server.wait_for(
                lambda s: (
                    not s["sessions"]
                    and s["engines"]["tiny"]["open_sessions"] == 0
                    and s["engines"]["tiny"]["queue_depth"] == 0
                ),
                timeout_s=40,
            )
            _, metrics = await asyncio.to_thread(server.get, "/metrics")
            assert 'rt_errors_total{code="stalled"}' in metrics
    finally:
        ws.transport.abort()


@pytest.mark.asyncio
async def test_disconnect_mid_stream_frees_its_work_and_tasks(server: RunningServer) -> None:
    async with asyncio.timeout(60):
        baseline = await server.wait_for(lambda s: not s["sessions"])
        ws = await _connect(server)
        await ws.send(json.dumps({"type": "phonemes", "text": LONG_TEXT}))
        await ws.send(json.dumps({"type": "flush"}))
        while not isinstance(await ws.recv(), bytes):
            pass
        busy = await asyncio.to_thread(server.state)
        assert busy["tasks"] > baseline["tasks"]  # a reader and a writer task, at least
        ws.transport.abort()  # no close handshake: the TCP connection just goes
        state = await server.wait_for(
            lambda s: (
                not s["sessions"]
                and s["engines"]["tiny"]["open_sessions"] == 0
                and s["engines"]["tiny"]["queue_depth"] == 0
                and s["engines"]["tiny"]["sessions"] == 0
                and s["tasks"] <= baseline["tasks"]
            )
        )
        assert state["tasks"] == baseline["tasks"]


@pytest.mark.asyncio
async def test_sessions_beyond_capacity_are_refused_before_work(server: RunningServer) -> None:
    async with asyncio.timeout(60):
        await server.wait_for(lambda s: not s["sessions"])
        held = [await _connect(server) for _ in range(3)]
        refused = await websockets.connect(server.url, compression=None)
        got = await receive_until_closed(refused)
        assert got.events == [
            {
                "type": "error",
                "code": "at_capacity",
                "message": "the server is at capacity (3 sessions)",
                "close_code": 1013,
            }
        ]
        assert got.close_code == 1013
        await held[0].close()
        await server.wait_for(lambda s: len(s["sessions"]) == 2)
        again = await _connect(server)  # room again
        for ws in [*held[1:], again]:
            await ws.close()


@pytest.mark.asyncio
async def test_graceful_shutdown_finishes_pending_work_then_closes_with_1001() -> None:
    running = start_server(make_settings(shutdown_grace_s=20.0))
    try:
        async with asyncio.timeout(60):
            busy = await _connect(running)
            idle = await _connect(running)
            await busy.send(json.dumps({"type": "phonemes", "text": "həlˈoʊ wˈɜːld"}))  # not yet cut
            await asyncio.sleep(0.05)
            stopping = asyncio.create_task(asyncio.to_thread(running.stop))
            busy_got, idle_got = await asyncio.gather(receive_until_closed(busy), receive_until_closed(idle))
            await stopping
    finally:
        if running.thread.is_alive():
            running.stop()
    shutting_down = {
        "type": "error",
        "code": "shutting_down",
        "message": "the server is shutting down",
        "close_code": 1001,
    }
    assert idle_got.items == [shutting_down]
    assert idle_got.close_code == 1001
    assert busy_got.events == [shutting_down]
    assert busy_got.frames, "the pending text was synthesised and sent before the close"
    assert isinstance(busy_got.items[-1], dict)
    assert busy_got.close_code == 1001
