"""SIGTERM to a real `rt-server serve` process with sessions open: it stops accepting, lets sessions finish
within the grace period, closes the rest with `shutting_down` / 1001, and exits with status 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import websockets
from server_harness import Received, receive_until_closed

LONG = " ".join(["wˈʌn tˈuː θɹˈiː.", "fˈɔːɹ fˈaɪv sˈɪks.", "sˈɛvən ˈeɪt nˈaɪn.", "tˈɛn ɪlˈɛvən."] * 3)
LONG_AUDIO_MS = 13_000  # LONG is well over 13 s of audio in the tiny model
GRACE_S = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


async def _open(url: str, **fields: object) -> websockets.ClientConnection:
    ws = await websockets.connect(url, compression=None)
    await ws.send(json.dumps({"type": "start", **fields}))
    assert json.loads(await ws.recv())["type"] == "ready"
    return ws


@pytest.mark.timeout(150)
def test_sigterm_finishes_what_it_can_within_the_grace_period_closes_the_rest_with_1001_and_exits_0() -> None:
    port = _free_port()
    env = {**os.environ, "RT_SERVER_NOISE": "off", "RT_SERVER_SHUTDOWN_GRACE_S": str(GRACE_S)}
    command = [sys.executable, "-m", "rt_server", "serve", "--model", "tiny", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"ws://127.0.0.1:{port}/v1/stream"

    async def scenario() -> tuple[Received, Received, BaseException | None]:
        async with asyncio.timeout(100):
            finishing = await _open(url)
            await finishing.send(json.dumps({"type": "phonemes", "text": "həlˈoʊ wˈɜːld"}))  # pending, unflushed
            # real-time pace: this one cannot send 13 s of audio within the grace period
            endless = await _open(url, pace="realtime", lead_ms=0)
            await endless.send(json.dumps({"type": "phonemes", "text": LONG}))
            await endless.send(json.dumps({"type": "flush"}))
            first = await endless.recv()
            assert isinstance(first, bytes)
            process.send_signal(signal.SIGTERM)
            endless_task = asyncio.create_task(receive_until_closed(endless))
            finishing_got = await receive_until_closed(finishing)
            refused: BaseException | None = None
            try:  # the server is draining `endless` now, and accepts no one
                late = await websockets.connect(url, compression=None, open_timeout=5)
                await late.close()
            except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
                refused = exc
            endless_got = await endless_task
            return finishing_got, endless_got, refused

    try:
        _wait_ready(process, port)
        finishing_got, endless_got, refused = asyncio.run(scenario())
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    shutting_down = {
        "type": "error",
        "code": "shutting_down",
        "message": "the server is shutting down",
        "close_code": 1001,
    }
    assert finishing_got.frames, "its pending text was synthesised and sent before the close"
    assert finishing_got.events == [shutting_down]
    assert (finishing_got.close_code, finishing_got.close_reason) == (1001, "shutting_down")
    assert endless_got.events == [shutting_down]
    assert endless_got.close_code == 1001
    sent_ms = sum(len(f) for f in endless_got.frames) / 48
    assert sent_ms < LONG_AUDIO_MS, "closed at the deadline, not after all of its audio"
    assert refused is not None, "a connection was accepted while draining"
