"""The access guard: ASGI middleware that applies `rt_server.access.AccessPolicy` before any route runs.

HTTP requests that are refused get 401 (with `WWW-Authenticate: Bearer`) or 403 and a JSON body. WebSocket
handshakes are refused before the upgrade completes, with the same status and body, through the ASGI
"websocket.http.response" extension (uvicorn has it). Where a server lacks it, the connection is accepted and
gets the protocol's `error` event, then close 1008 with the error code as the reason.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rt_server.access import AccessPolicy, Refusal
from rt_server.protocol import ErrorEvent, close_code_for, close_reason_for, encode_event


class AccessGuard:
    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        query = scope.get("query_string", b"").decode("latin-1")
        refusal = self.policy.check(scope["path"], headers, query, websocket=kind == "websocket")
        if refusal is None:
            await self.app(scope, receive, send)
        elif kind == "http":
            await send(_response_start("http.response.start", refusal))
            await send({"type": "http.response.body", "body": _body(refusal)})
        else:
            await _refuse_websocket(scope, receive, send, refusal)


def _body(refusal: Refusal) -> bytes:
    return json.dumps({"error": refusal.code.value, "message": refusal.message}).encode()


def _response_start(kind: str, refusal: Refusal) -> Message:
    headers = [(b"content-type", b"application/json")]
    if refusal.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="rt_server"'))
    return {"type": kind, "status": refusal.status, "headers": headers}


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the client left during the handshake
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(_response_start("websocket.http.response.start", refusal))
        await send({"type": "websocket.http.response.body", "body": _body(refusal)})
        return
    close_code = close_code_for(refusal.code)
    assert close_code is not None
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": encode_event(ErrorEvent(refusal.code, refusal.message))})
    await send({"type": "websocket.close", "code": int(close_code), "reason": close_reason_for(refusal.code)})
