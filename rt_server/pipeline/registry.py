"""The server's open sessions: admission (capacity overall and per client, draining) and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Final

from rt_server.pipeline.session import Session
from rt_server.protocol import ErrorCode

# After the grace period, sessions get a fatal `shutting_down`; this is how long their writers get to send it.
_FORCED_CLOSE_WAIT_S: Final = 3.0


class SessionRegistry:
    def __init__(self, max_sessions: int, max_sessions_per_client: int | None = None) -> None:
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client or max_sessions
        self._sessions: dict[str, tuple[Session, str]] = {}  # bound: max_sessions; session and its client
        self._per_client: Counter[str] = Counter()  # bound: one entry per client with an open session
        self._empty = asyncio.Event()
        self._empty.set()
        self.draining = False

    def admit(self, session: Session, client: str = "") -> ErrorCode | None:
        """Register a new session of `client` (its peer address), or say why it is refused (before any work is
        done for it).
        """
        if self.draining:
            return ErrorCode.SHUTTING_DOWN
        if len(self._sessions) >= self.max_sessions:
            return ErrorCode.AT_CAPACITY
        if self._per_client[client] >= self.max_sessions_per_client:
            return ErrorCode.CLIENT_AT_CAPACITY
        self._sessions[session.session_id] = (session, client)
        self._per_client[client] += 1
        self._empty.clear()
        return None

    def remove(self, session: Session) -> None:
        entry = self._sessions.pop(session.session_id, None)
        if entry is not None:
            client = entry[1]
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]
        if not self._sessions:
            self._empty.set()

    @property
    def clients(self) -> int:
        """Clients (peer addresses) with an open session."""
        return len(self._per_client)

    def sessions(self) -> list[Session]:
        return [session for session, _ in self._sessions.values()]

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
