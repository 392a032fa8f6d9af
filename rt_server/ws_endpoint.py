"""`GET /v1/stream`: the only module that touches the WebSocket object.

It adapts Starlette's WebSocket to the session's `Transport`, refuses connections the registry does not admit
(`error` then close 1013 or 1001, before any work), and runs the session. Keys and origins were checked before
the upgrade (rt_server.guard).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from rt_server.pipeline.ports import SessionObserver, SynthesisBackend, TransportClosedError
from rt_server.pipeline.registry import SessionRegistry
from rt_server.pipeline.session import Session
from rt_server.pipeline.session_config import SessionConfig
from rt_server.protocol import ErrorCode, ErrorEvent, close_code_for, close_reason_for, encode_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointContext:
    """What the endpoint needs from the composition root (set on `app.state.endpoint` by rt_server.app)."""

    registry: SessionRegistry
    backends: Mapping[str, SynthesisBackend]
    default_model: str
    session_config: SessionConfig
    observer: SessionObserver


class StarletteTransport:
    """Starlette's WebSocket as a `Transport`: disconnects become None / TransportClosedError."""

    def __init__(self, websocket: WebSocket) -> None:
        self._ws = websocket

    async def receive(self) -> str | bytes | None:
        if self._ws.client_state is not WebSocketState.CONNECTED:
            return None
        message = await self._ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        text = message.get("text")
        if text is not None:
            return str(text)
        return bytes(message.get("bytes") or b"")

    async def send_text(self, text: str) -> None:
        try:
            await self._ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise TransportClosedError from exc

    async def send_bytes(self, data: bytes) -> None:
        try:
            await self._ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise TransportClosedError from exc

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._ws.close(code, reason)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise TransportClosedError from exc


async def stream_endpoint(websocket: WebSocket) -> None:
    context: EndpointContext = websocket.app.state.endpoint
    await websocket.accept()
    transport = StarletteTransport(websocket)
    session = Session(
        session_id=uuid.uuid4().hex[:16],
        transport=transport,
        backends=context.backends,
        default_model=context.default_model,
        config=context.session_config,
        observer=context.observer,
    )
    client = websocket.client.host if websocket.client is not None else ""
    refusal = context.registry.admit(session, client)
    if refusal is not None:
        await _refuse(transport, refusal, context)
        return
    context.observer.on_session_admitted()
    try:
        await session.run()
    finally:
        context.registry.remove(session)


async def _refuse(transport: StarletteTransport, code: ErrorCode, context: EndpointContext) -> None:
    message = {
        ErrorCode.AT_CAPACITY: f"the server is at capacity ({context.registry.max_sessions} sessions)",
        ErrorCode.CLIENT_AT_CAPACITY: (
            f"this client has {context.registry.max_sessions_per_client} sessions open, the limit per client"
        ),
        ErrorCode.SHUTTING_DOWN: "the server is shutting down",
    }.get(code, code.value)
    context.observer.on_error(code)
    close_code = close_code_for(code)
    assert close_code is not None
    try:
        await transport.send_text(encode_event(ErrorEvent(code, message)))
        await transport.close(close_code, close_reason_for(code))
    except TransportClosedError:
        pass
