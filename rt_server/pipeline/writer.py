"""A session's writer: the one task that awaits the socket. Sends the outbox in order, paced, stall-guarded."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable

from rt_server.pipeline.flow import Pacer
from rt_server.pipeline.outbox import AudioFrame, CloseFrame, Outbox, OutItem, TextEvent
from rt_server.pipeline.ports import Transport, TransportClosedError


class WriterExit(enum.Enum):
    CLOSED = "closed"  # a close frame was sent
    DISCONNECTED = "disconnected"  # the peer went away
    STALLED = "stalled"  # one send stayed blocked for `stall_timeout_s`: the client stopped reading


class Writer:
    """Sends control items first, then the ordered stream; audio frames wait for the pacer.

    `wake` is set by whoever queues output (or changes it: `clear`, a fatal error); the writer re-reads the outbox
    after every wait, so dropped items are never sent. `on_audio_sent(frame, now)` runs after each frame.
    """

    def __init__(
        self,
        transport: Transport,
        outbox: Outbox,
        wake: asyncio.Event,
        *,
        stall_timeout_s: float,
        pacer: Callable[[], Pacer],
        on_audio_sent: Callable[[AudioFrame, float], None],
        on_taken: Callable[[OutItem], None] | None = None,
    ) -> None:
        self._transport = transport
        self._outbox = outbox
        self._wake = wake
        self._stall_timeout_s = stall_timeout_s
        self._pacer = pacer  # read on each frame: the session sets its pacer at `start`
        self._on_audio_sent = on_audio_sent
        self._on_taken = on_taken  # after an item leaves the outbox for the socket
        self.in_flight: OutItem | None = None  # taken from the outbox, its send not finished

    async def run(self) -> WriterExit:
        while True:
            self._wake.clear()
            item = self._outbox.peek()
            if item is None:
                await self._wake.wait()
                continue
            if isinstance(item, AudioFrame):
                delay_s = self._pacer().delay_s(time.monotonic(), item.duration_ms)
                if delay_s > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay_s):
                            await self._wake.wait()  # a control item or a `clear` may come first
                    continue
            self._outbox.pop()
            self.in_flight = item
            if self._on_taken is not None:
                self._on_taken(item)
            try:
                async with asyncio.timeout(self._stall_timeout_s):
                    await self._send(item)
            except TimeoutError:
                return WriterExit.STALLED
            except TransportClosedError:
                return WriterExit.DISCONNECTED
            finally:
                self.in_flight = None
            if isinstance(item, CloseFrame):
                return WriterExit.CLOSED
            if isinstance(item, AudioFrame):
                now = time.monotonic()
                self._pacer().on_sent(now, item.duration_ms)
                self._on_audio_sent(item, now)

    async def _send(self, item: OutItem) -> None:
        if isinstance(item, AudioFrame):
            await self._transport.send_bytes(item.data)
        elif isinstance(item, TextEvent):
            await self._transport.send_text(item.text)
        else:
            await self._transport.close(item.code, item.reason)
