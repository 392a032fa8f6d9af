"""The server's open sessions: admission (capacity, draining) and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from rt_server.pipeline.session import Session
from rt_server.protocol import ErrorCode

# After the grace period, sessions get a fatal `shutting_down`; this is how long their writers get to send it.
_FORCED_CLOSE_WAIT_S: Final = 3.0


class SessionRegistry:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}  # bound: max_sessions
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False

    def admit(self, session: Session) -> ErrorCode | None:
        """Register a new session, or say why it is refused (before any work is done for it)."""
        if self.draining:
            return ErrorCode.SHUTTING_DOWN
        if len(self._sessions) >= self.max_sessions:
            return ErrorCode.AT_CAPACITY
        self._sessions[session.session_id] = session
        self._empty.clear()
        return None

    def remove(self, session: Session) -> None:
        self._sessions.pop(session.session_id, None)
        if not self._sessions:
            self._empty.set()

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    async def drain(self, grace_s: float) -> None:
        """Stop admitting; let sessions finish pending work for up to `grace_s`, then close the rest with
        1001.
        """
        self.draining = True
        for session in self.sessions():
            session.begin_shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self._empty.wait()
        for session in self.sessions():
            session.fail(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FORCED_CLOSE_WAIT_S):
                await self._empty.wait()
