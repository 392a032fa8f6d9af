"""Clients that push the protocol's edges on a real server, through a raw socket so that many frames can share
one TCP write: a burst of pipelined messages, flushes from a client that never reads, one message that would
cut more segments than a session may hold, rejected messages against the idle timeout, and the timeline after a
`clear` that catches a frame mid-send.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from server_harness import RunningServer, make_settings, start_server

pytestmark = pytest.mark.timeout(120)

SENTENCES = ["wˈʌn tˈuː θɹˈiː.", "fˈɔːɹ fˈaɪv sˈɪks.", "sˈɛvən ˈeɪt nˈaɪn.", "tˈɛn ɪlˈɛvən."]
MAX_TICKETS = 256  # SessionConfig.max_pending_tickets


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = make_settings(stall_timeout_s=4.0)
    running = start_server(settings, sndbuf_bytes=4096)
    yield running
    running.stop()


class RawClient:
    """A WebSocket client on a plain socket: frames are written as given, several per write if asked."""

    def __init__(self, port: int, *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self._buffer = b""

    @staticmethod
    def frame(message: dict[str, Any]) -> bytes:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def send(self, *messages: dict[str, Any]) -> None:
        self.sock.sendall(b"".join(self.frame(m) for m in messages))

    def receive(self, until: Any, timeout_s: float = 20.0) -> list[Any]:
        """Frames until `until(item)` is true or the connection closes: events as dicts, audio as byte counts,
        the close as ("close", code)."""
        items: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while len(self._buffer) >= 2:
                opcode, n, start = self._buffer[0] & 0x0F, self._buffer[1] & 0x7F, 2
                if n == 126:
                    n, start = struct.unpack(">H", self._buffer[2:4])[0], 4
                elif n == 127:
                    n, start = struct.unpack(">Q", self._buffer[2:10])[0], 10
                if len(self._buffer) < start + n:
                    break
                payload, self._buffer = self._buffer[start : start + n], self._buffer[start + n :]
                item: Any
                if opcode == 1:
                    item = json.loads(payload)
                elif opcode == 2:
                    item = len(payload)
                else:
                    item = ("close", struct.unpack(">H", payload[:2])[0])
                items.append(item)
                if until(item) or isinstance(item, tuple):
                    return items
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                return items
            self._buffer += data
        raise AssertionError(f"timed out after {len(items)} items")

    def receive_without_errors(self, kind: str, count: int) -> list[Any]:
        """Frames until `count` events of `kind` came; asserts that no error and no close came meanwhile."""
        seen: list[Any] = []
        while _events(seen).count(kind) < count:
            got = self.receive(lambda item: True)
            assert got and not any(isinstance(i, tuple) or _is("error")(i) for i in got), got
            seen += got
        return seen

    def close(self) -> None:
        self.sock.close()


def _is(kind: str) -> Any:
    return lambda item: isinstance(item, dict) and item["type"] == kind


def _events(items: list[Any]) -> list[str]:
    return [item["type"] if isinstance(item, dict) else "audio" for item in items if not isinstance(item, int)]


def test_a_burst_of_pipelined_messages_in_one_write_is_answered_in_full(server: RunningServer) -> None:
    # 80 messages reach the reader at once, each with an answer: more than the control queue holds (64). The
    # session reads them as its writer catches up instead of declaring a client that reads `stalled`.
    client = RawClient(server.port)
    client.send({"type": "start"}, *[{"type": "clear"}] * 80)
    seen = client.receive_without_errors("cleared", 80)
    client.close()
    assert _events(seen) == ["ready"] + ["cleared"] * 80


def test_a_hundred_flushes_in_one_write_are_all_answered_in_order(server: RunningServer) -> None:
    # More `flushed` events than the ordered stream holds (32): the rest wait as tickets and come out as the
    # writer sends the earlier ones.
    client = RawClient(server.port)
    client.send({"type": "start"}, *[{"type": "flush", "id": n} for n in range(100)])
    seen = client.receive_without_errors("flushed", 100)
    client.close()
    assert [i["id"] for i in seen if _is("flushed")(i)] == list(range(100))


def test_flushes_from_a_client_that_never_reads_stay_bounded(server: RunningServer) -> None:
    # Each `flush` becomes a ticket, then a `flushed` event. A client that sends them without reading holds
    # at most 32 events in the outbox's ordered stream and 256 tickets behind them; past that its flushes are
    # refused (`input_overflow`, control events), and once 32 of those wait the session stops reading its
    # input: the socket pushes back, and the writer's stall timeout closes it. Before, the events piled up
    # without bound (211,171 after 6 s).
    client = RawClient(server.port, rcvbuf=4096)
    client.send({"type": "start"})
    burst = b"".join(client.frame({"type": "flush", "id": "x" * 128}) for _ in range(500))
    client.sock.settimeout(0.5)
    seen: list[dict[str, Any]] = []

    def spam() -> None:
        for _ in range(100):  # 50,000 flushes: the socket blocks long before
            client.sock.sendall(burst)
            seen.extend(server.state()["sessions"].values())

    try:
        with pytest.raises((TimeoutError, ConnectionError)):  # the send blocks (or the server gave up already)
            spam()
        seen.extend(server.state()["sessions"].values())
        assert 32 < max(s["outbox_items"] for s in seen) <= 32 + 32 + 4
        assert max(s["tickets"] for s in seen) <= 256
        deadline = time.monotonic() + 20.0  # the stall timeout is 4 s; a loaded machine may take longer
        while server.state()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.state()["sessions"] == {}
    finally:
        client.close()
    _, metrics = server.get("/metrics")
    assert any(line.startswith('rt_errors_total{code="stalled"}') for line in metrics.splitlines())


def test_a_message_that_would_cut_more_segments_than_a_session_may_hold_is_refused_whole(
    server: RunningServer,
) -> None:
    client = RawClient(server.port)
    client.send({"type": "start"}, {"type": "phonemes", "text": "ə. " * (MAX_TICKETS + 1)})
    items = client.receive(_is("error"))
    assert [(i["code"], i["message"]) for i in items if _is("error")(i)] == [
        ("input_overflow", f"over {MAX_TICKETS} segments and flushes would be pending")
    ]
    (session,) = server.state()["sessions"].values()
    assert session["tickets"] == 0 and session["pending_phonemes"] == 0  # no work was started for it
    client.send({"type": "phonemes", "text": "ə. " * 4}, {"type": "flush", "id": "ok"})
    items = client.receive(_is("flushed"))
    assert any(isinstance(i, int) for i in items)  # the session goes on: audio came
    assert not any(_is("error")(i) for i in items)
    client.close()


def test_rejected_messages_count_as_activity_for_the_idle_timeout() -> None:
    server = start_server(make_settings(idle_timeout_s=1.0))
    try:
        _rejected_messages_against_the_idle_timeout(server)
    finally:
        server.stop()


def _rejected_messages_against_the_idle_timeout(server: RunningServer) -> None:
    client = RawClient(server.port)
    client.send({"type": "start"})
    assert _events(client.receive(_is("ready"))) == ["ready"]
    started = time.monotonic()
    for _ in range(8):  # 1.6 s of messages, each rejected (`text` must be a string), past the 1 s timeout
        client.send({"type": "phonemes", "text": 5})
        time.sleep(0.2)
    items = client.receive(lambda item: isinstance(item, tuple), timeout_s=5.0)  # until the close
    codes = [i["code"] for i in items if _is("error")(i)]
    assert codes == ["invalid_field"] * 8 + ["idle_timeout"]
    assert time.monotonic() - started >= 1.4 + 1.0 - 0.1  # the last message went at 1.4 s
    client.close()


def test_after_clear_the_timeline_continues_from_the_audio_the_client_got() -> None:
    # A client that does not read while audio piles up, so that the writer is blocked mid-frame when `clear`
    # arrives: that frame still reaches the client, and the next segment's start_ms must count it.
    server = start_server(make_settings(stall_timeout_s=30.0), sndbuf_bytes=4096)
    try:
        _timeline_after_clear(server)
    finally:
        server.stop()


def _timeline_after_clear(server: RunningServer) -> None:
    client = RawClient(server.port, rcvbuf=4096)
    client.send(
        {"type": "start", "alignment": True, "encoding": "pcm_s16le", "frame_ms": 20},
        {"type": "phonemes", "text": " ".join(SENTENCES * 2) + " "},
        {"type": "flush", "id": "long"},
    )
    time.sleep(2.0)
    (session,) = server.state()["sessions"].values()
    assert session["outbox_items"] > 0  # the writer is blocked on the socket: a frame is mid-send
    client.send({"type": "clear"})
    before = client.receive(_is("cleared"))
    audio_ms = sum(i for i in before if isinstance(i, int)) / 2 / 24  # s16 at 24 kHz: 48 bytes a ms
    assert audio_ms > 0
    client.send({"type": "phonemes", "text": SENTENCES[0] + " "}, {"type": "flush", "id": "next"})
    after = client.receive(_is("flushed"))
    segments = [i for i in after if _is("segment")(i)]
    assert segments and segments[0]["start_ms"] == pytest.approx(audio_ms)
    client.close()
