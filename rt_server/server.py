"""Running the app under uvicorn, with a graceful drain before uvicorn closes connections itself.

uvicorn's own shutdown closes every WebSocket with 1012 at once and, after a signal, re-raises it so the
process dies by SIGTERM. `RtServer` first stops accepting and drains the sessions (finish within the grace
period, then `error` + 1001), and exits normally (status 0) after SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Generator
from typing import Final

import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from rt_server.app import ServerState
from rt_server.settings import Settings

_HANDLED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
# The socket transport's write buffer per connection (asyncio's default is 64 KiB high, 16 KiB low). A narrow
# hysteresis lets a send resume as soon as the client has read 8 KiB, so a send blocked for `stall_timeout_s`
# means the client has (nearly) stopped reading, not that it reads slowly through a 48 KiB drain.
WRITE_BUFFER_HIGH_BYTES: Final = 64 * 1024
WRITE_BUFFER_LOW_BYTES: Final = 56 * 1024


class _WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol with the write-buffer limits above."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH_BYTES, low=WRITE_BUFFER_LOW_BYTES)


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws=_WebSocketProtocol,
        # Per-message deflate only burns CPU on PCM (it barely compresses).
        ws_per_message_deflate=False,
        # The hard ceiling, where uvicorn closes with a bare 1009; below it, messages over
        # max_message_bytes get
        # the protocol's `error` + 1009. Also bounds what one message can cost in memory.
        ws_max_size=4 * settings.max_message_bytes,
        ws_ping_interval=settings.ws_ping_interval_s or None,
        ws_ping_timeout=settings.ws_ping_interval_s or None,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


class RtServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Like uvicorn's, without re-raising the signal afterwards: a drained server exits with status 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting first
        await self._state.drain()
        await super().shutdown(sockets)


def build_server(app: Starlette, settings: Settings) -> RtServer:
    state: ServerState = app.state.rt
    return RtServer(uvicorn_config(app, settings), state)
