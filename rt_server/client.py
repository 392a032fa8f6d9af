"""A Python client for protocol v1: an async context manager over one `/v1/stream` session.

    async with StreamClient.connect("ws://127.0.0.1:8000/v1/stream", voice="af_heart") as client:
        await client.send_phonemes("həlˈoʊ wˈɜːld.")
        await client.close()
        async for item in client:          # bytes (one audio frame) or a server event dataclass
            ...

Iteration ends when the server closes the socket; `close_code` then says how.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from rt_server.protocol import (
    Clear,
    ClientMessage,
    Close,
    Encoding,
    ErrorEvent,
    Flush,
    Pace,
    Phonemes,
    Ready,
    ServerEvent,
    Start,
    encode_client_message,
    parse_server_event,
)

# Audio frames are at most 200 ms of 48 kHz f32 (38400 B); events are small. 1 MiB bounds any one message.
_MAX_MESSAGE_BYTES: Final = 1 << 20
# websockets' receive buffer, in messages (its own bound; high/low water marks as it documents them).
_MAX_QUEUED_MESSAGES: Final = 64


class StreamError(Exception):
    """The server refused the session (the `error` event it sent, and the close code)."""

    def __init__(self, event: ErrorEvent | None, close_code: int | None) -> None:
        message = event.message if event is not None else "connection closed before `ready`"
        super().__init__(f"{event.code.value if event else 'closed'}: {message} (close {close_code})")
        self.event = event
        self.close_code = close_code


class StreamClient:
    def __init__(self, ws: ClientConnection, ready: Ready) -> None:
        self._ws = ws
        self.ready = ready

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        voice: str | None = None,
        speed: float = 1.0,
        model: str | None = None,
        encoding: Encoding = "pcm_s16le",
        sample_rate_hz: int = 24_000,
        frame_ms: int = 20,
        pace: Pace = "none",
        lead_ms: int = 500,
        alignment: bool = False,
        open_timeout_s: float = 10.0,
    ) -> AsyncIterator[StreamClient]:
        """Open a session: connect, send `start`, wait for `ready` (raises StreamError if refused)."""
        start = Start(
            voice=voice,
            speed=speed,
            model=model,
            encoding=encoding,
            sample_rate_hz=sample_rate_hz,
            frame_ms=frame_ms,
            pace=pace,
            lead_ms=lead_ms,
            alignment=alignment,
        )
        async with connect(
            url,
            compression=None,  # PCM does not compress; deflate only costs CPU
            max_size=_MAX_MESSAGE_BYTES,
            max_queue=_MAX_QUEUED_MESSAGES,
            open_timeout=open_timeout_s,
        ) as ws:
            await ws.send(encode_client_message(start))
            try:
                first = await ws.recv()
            except ConnectionClosed:
                raise StreamError(None, ws.close_code) from None
            event = parse_server_event(first) if isinstance(first, str) else None
            if not isinstance(event, Ready):
                error = event if isinstance(event, ErrorEvent) else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(open_timeout_s):
                        await ws.wait_closed()
                raise StreamError(error, ws.close_code)
            yield cls(ws, event)

    async def _send(self, message: ClientMessage) -> None:
        await self._ws.send(encode_client_message(message))

    async def send_phonemes(self, text: str) -> None:
        await self._send(Phonemes(text))

    async def flush(self, flush_id: str | int | None = None) -> None:
        await self._send(Flush(flush_id))

    async def clear(self) -> None:
        await self._send(Clear())

    async def close(self) -> None:
        """Ask the server to finish: remaining audio, `done`, then close 1000. Keep iterating to receive
        it.
        """
        await self._send(Close())

    async def receive(self) -> bytes | ServerEvent | None:
        """The next audio frame or event; None once the server has closed the connection."""
        try:
            message = await self._ws.recv()
        except ConnectionClosed:
            return None
        if isinstance(message, bytes):
            return message
        return parse_server_event(message)

    def __aiter__(self) -> AsyncIterator[bytes | ServerEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes | ServerEvent]:
        while (item := await self.receive()) is not None:
            yield item

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def close_reason(self) -> str | None:
        return self._ws.close_reason
