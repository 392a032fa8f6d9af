"""Security on a real server: API keys and the Origin allow-list before the upgrade, keys on the HTTP
endpoints, the per-client session limit, the idle timeout, and names that are looked up, never joined into paths.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from server_harness import RunningServer, make_settings, receive_until_closed, start_server

from rt_server.access import AccessPolicy, ApiKeys
from rt_server.app import WEB_CLIENT_DIR
from rt_server.engine import LoadedModel
from rt_server.guard import AccessGuard
from rt_server.settings import ModelSpec

pytestmark = pytest.mark.timeout(120)

KEY = "test-key-0123456789abcdef"
ORIGIN = "https://app.example"
BEARER = {"Authorization": f"Bearer {KEY}"}
HTTP_PROTECTED = ["/readyz", "/v1/models", "/v1/voices", "/metrics", "/debug/state"]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = make_settings(api_keys=(KEY,), allowed_origins=(ORIGIN,), max_sessions_per_client=2)
    running = start_server(settings)
    running.headers = dict(BEARER)
    yield running
    running.stop()


async def _refused(url: str, **kwargs: Any) -> Any:
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(url, compression=None, **kwargs)
    return info.value.response


async def _ready(url: str, **kwargs: Any) -> Any:
    ws = await websockets.connect(url, compression=None, **kwargs)
    await ws.send(json.dumps({"type": "start"}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws


@pytest.mark.asyncio
async def test_websocket_without_a_valid_key_is_refused_before_the_upgrade(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        _, before = await asyncio.to_thread(server.get, "/metrics")
        missing = await _refused(server.url)
        wrong_header = await _refused(server.url, additional_headers={"Authorization": "Bearer x" + KEY[1:]})
        wrong_query = await _refused(server.url + "?api_key=" + KEY[:-1])
        basic = await _refused(server.url, additional_headers={"Authorization": f"Basic {KEY}"})
        _, after = await asyncio.to_thread(server.get, "/metrics")
    for response in (missing, wrong_header, wrong_query, basic):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="rt_server"'
        assert json.loads(response.body) == {"error": "unauthorized", "message": "a valid API key is required"}
    sessions_total = [line for line in before.splitlines() if line.startswith("rt_sessions_total")]
    assert sessions_total == [line for line in after.splitlines() if line.startswith("rt_sessions_total")]


@pytest.mark.asyncio
async def test_a_valid_key_as_bearer_header_or_query_parameter_opens_a_session(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        by_header = await _ready(server.url, additional_headers=BEARER)
        by_query = await _ready(server.url + f"?api_key={KEY}", origin=ORIGIN)  # a browser on an allowed page
        for ws in (by_header, by_query):
            await ws.send(json.dumps({"type": "close"}))
            got = await receive_until_closed(ws)
            assert (got.types(), got.close_code) == (["done"], 1000)


@pytest.mark.asyncio
async def test_a_browser_from_another_origin_is_refused_even_with_a_key(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        responses = [
            await _refused(server.url + f"?api_key={KEY}", origin=origin)
            for origin in ("https://evil.example", "https://app.example.evil", "http://app.example", "null")
        ]
    for response in responses:
        assert response.status_code == 403
        assert json.loads(response.body)["error"] == "forbidden_origin"


@pytest.mark.asyncio
async def test_http_endpoints_follow_the_keys_except_healthz(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        for path in HTTP_PROTECTED:
            status, body = await asyncio.to_thread(server.get, path, {})
            assert (status, json.loads(body)["error"]) == (401, "unauthorized"), path
            status, _ = await asyncio.to_thread(server.get, path, BEARER)
            assert status == 200, path
            joiner = "&" if "?" in path else "?"
            status, _ = await asyncio.to_thread(server.get, f"{path}{joiner}api_key={KEY}", {})
            assert status == 200, path
        assert await asyncio.to_thread(server.get, "/healthz", {}) == (200, '{"status":"ok"}')
        if WEB_CLIENT_DIR.is_dir():  # the static page is public: it asks for the key itself
            status, _ = await asyncio.to_thread(server.get, "/", {})
            assert status == 200


@pytest.mark.asyncio
async def test_sessions_per_client_are_limited_by_peer_address(server: RunningServer) -> None:
    async with asyncio.timeout(30):
        await server.wait_for(lambda s: not s["sessions"])
        held = [await _ready(server.url, additional_headers=BEARER) for _ in range(2)]
        over = await websockets.connect(server.url, compression=None, additional_headers=BEARER)
        got = await receive_until_closed(over)
        # another client (uvicorn trusts X-Forwarded-For from a proxy on loopback) still gets in
        elsewhere = await _ready(server.url, additional_headers={**BEARER, "X-Forwarded-For": "203.0.113.9"})
        state = await asyncio.to_thread(server.state)
        await held[0].close()
        await server.wait_for(lambda s: len(s["sessions"]) == 2)
        again = await _ready(server.url, additional_headers=BEARER)  # room again for this client
        for ws in (held[1], elsewhere, again):
            await ws.close()
    assert got.events == [
        {
            "type": "error",
            "code": "client_at_capacity",
            "message": "this client has 2 sessions open, the limit per client",
            "close_code": 1013,
        }
    ]
    assert (got.close_code, got.close_reason) == (1013, "client_at_capacity")
    assert state["clients"] == 2


@pytest.mark.asyncio
async def test_without_the_handshake_extension_a_refusal_is_an_error_then_1008() -> None:
    """Servers without "websocket.http.response" cannot answer 401: the guard accepts, sends `error`, closes."""
    policy = AccessPolicy(ApiKeys([KEY]), frozenset(), frozenset())
    guard = AccessGuard(_never_called, policy)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/stream", "headers": [], "query_string": b"", "extensions": {}}
    async with asyncio.timeout(5):
        await guard(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == {
        "type": "error",
        "code": "unauthorized",
        "message": "a valid API key is required",
        "close_code": 1008,
    }
    assert (sent[2]["code"], sent[2]["reason"]) == (1008, "unauthorized")


async def _never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("a refused request reached the app")


# --------------------------------------------------------------------------------------------- idle timeout


@pytest.mark.asyncio
async def test_an_idle_session_is_closed_but_not_while_audio_is_still_going_out() -> None:
    running = start_server(make_settings(idle_timeout_s=1.0))
    try:
        async with asyncio.timeout(60):
            idle = await _ready(running.url)
            idle_got = await receive_until_closed(idle)
            # 3.5 s of audio paced in real time: the client sends nothing for longer than the timeout
            busy = await websockets.connect(running.url, compression=None)
            await busy.send(json.dumps({"type": "start", "pace": "realtime", "lead_ms": 0}))
            await busy.send(json.dumps({"type": "phonemes", "text": "wˈʌn tˈuː θɹˈiː. fˈɔːɹ fˈaɪv sˈɪks."}))
            await busy.send(json.dumps({"type": "flush", "id": "all"}))
            busy_got = await receive_until_closed(busy)
    finally:
        running.stop()
    timeout_error = {
        "type": "error",
        "code": "idle_timeout",
        "message": "no message for 1 s",
        "close_code": 1008,
    }
    assert idle_got.events == [timeout_error]
    assert (idle_got.close_code, idle_got.close_reason) == (1008, "idle_timeout")
    assert busy_got.types() == ["ready", "flushed", "error"]
    assert busy_got.events[-1] == timeout_error
    assert sum(len(f) for f in busy_got.frames) / 48 > 3000  # all of it arrived before the idle close


# ------------------------------------------------------------------------------------- names are not paths

VOICE_ATTACKS = [
    "../evil",
    "../evil.bin",
    "../../evil",
    "voices/../evil",
    "af_test/../../evil",
    "..\\evil",
    "%2e%2e%2fevil",
    "/etc/passwd",
    "../../../../../../etc/passwd",
    "../evil:0.5,af_test:0.5",
    "af_test\u0000../evil",
]
MODEL_ATTACKS = ["../../etc/passwd", "/etc/passwd", "tiny/../tiny", "..", "./tiny"]
_opened: list[str] = []
_watching = threading.Event()
_hooked: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching.is_set() and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
        _opened.append(str(args[0]))


@pytest.fixture(scope="module")
def voices_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """voices/af_test.bin, and a valid voice pack beside the directory: a name that walked out would find it."""
    from rt_server.model.runner import random_voice_pack

    root = tmp_path_factory.mktemp("traversal")
    (root / "voices").mkdir()
    random_voice_pack(1).astype("<f4").tofile(root / "voices" / "af_test.bin")
    random_voice_pack(2).astype("<f4").tofile(root / "evil.bin")
    return root


@pytest.mark.asyncio
async def test_voice_and_model_names_are_looked_up_never_joined_into_paths(voices_root: Path) -> None:
    def loader(spec: ModelSpec) -> LoadedModel:
        from rt_server.model.runner import ModelRunner, SynthesisRequest, tiny_model
        from rt_server.model.voices import VoiceLibrary

        library = VoiceLibrary.from_directory(voices_root / "voices")
        return LoadedModel(ModelRunner(tiny_model(0), library, name=spec.name), SynthesisRequest)

    running = start_server(make_settings(), loader=loader)
    if not _hooked:  # audit hooks cannot be removed: one for the process, active only while watching
        sys.addaudithook(_audit)
        _hooked.append(True)
    try:
        async with asyncio.timeout(60):
            _watching.set()
            voice_results = []
            for name in VOICE_ATTACKS:
                ws = await websockets.connect(running.url, compression=None)
                await ws.send(json.dumps({"type": "start", "voice": name}))
                voice_results.append(await receive_until_closed(ws))
            model_results = []
            for name in MODEL_ATTACKS:
                ws = await websockets.connect(running.url, compression=None)
                await ws.send(json.dumps({"type": "start", "model": name}))
                model_results.append(await receive_until_closed(ws))
            http = [
                await asyncio.to_thread(running.get, f"/v1/voices?model={name}")
                for name in ("../../etc/passwd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..")
            ]
            _watching.clear()
            good = await _ready(running.url)  # the library itself works
            await good.close()
    finally:
        _watching.clear()
        running.stop()
    for name, got in zip(VOICE_ATTACKS, voice_results, strict=True):
        assert (got.events[-1]["code"], got.close_code) == ("unknown_voice", 1008), name
    for name, got in zip(MODEL_ATTACKS, model_results, strict=True):
        assert (got.events[-1]["code"], got.close_code) == ("unknown_model", 1008), name
    assert [status for status, _ in http] == [404, 404, 404]
    touched = [p for p in _opened if "evil" in p or "passwd" in p or str(voices_root) in p]
    assert touched == [], "a name reached the file system"
    _watching.set()  # the hook is live: opening the file ourselves is seen
    (voices_root / "evil.bin").read_bytes()
    _watching.clear()
    assert any("evil.bin" in p for p in _opened)
