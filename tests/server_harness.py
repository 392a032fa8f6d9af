"""A real uvicorn server on a loopback port, in a thread with its own event loop, for the server tests."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rt_server.app import Loader, create_app, load_model
from rt_server.engine import LoadedModel
from rt_server.server import RtServer, build_server
from rt_server.settings import ModelSpec, Settings

TINY = ModelSpec(name="tiny", kind="tiny", seed=0)
TINY2 = ModelSpec(name="tiny2", kind="tiny", seed=1)


def make_settings(**changes: Any) -> Settings:
    """Deterministic (noise off), tiny models, debug endpoints on."""
    # trim_pauses and first_chunk_ms off: tests compare with offline synthesis of whole segments
    # (tests/test_first_segment.py covers both). Batches of up to 8 even on this CPU: the tests exercise
    # cross-session batching.
    base = Settings(
        models=(TINY,),
        noise=False,
        port=0,
        debug_endpoints=True,
        ws_ping_interval_s=0,
        trim_pauses=False,
        first_chunk_ms=0,
        max_batch_size=8,
    )
    return base.replace(**changes)


@dataclass
class RunningServer:
    server: RtServer
    thread: threading.Thread
    port: int
    headers: dict[str, str] = field(default_factory=dict)  # sent with every `get` (an API key, for example)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.http + path, headers=self.headers if headers is None else headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def state(self) -> dict[str, Any]:
        status, body = self.get("/debug/state")
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    async def wait_for(self, predicate: Any, timeout_s: float = 20.0) -> dict[str, Any]:
        """Poll /debug/state (off the event loop) until `predicate(state)` holds."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = await asyncio.to_thread(self.state)
            if predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; last state: {state}")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server thread did not stop"


def start_server(settings: Settings, *, sndbuf_bytes: int | None = None, loader: Loader = load_model) -> RunningServer:
    """Start on 127.0.0.1 and an ephemeral port; returns once the models are loaded and warm."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf_bytes is not None:  # accepted sockets inherit it: makes a slow reader's backpressure quick
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf_bytes)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    settings = settings.replace(port=port)
    server = build_server(create_app(settings, loader=loader), settings)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return RunningServer(server, thread, port)


POISON = "ʒʒʒ"  # a word that makes `poisoned_loader`'s runner raise: fault injection around the real model
BROKEN_VOICE = "broken"  # a voice whose check raises an unexpected error (a server fault, not a bad voice)


class _PoisonedRunner:
    """The real runner, except that a batch holding POISON raises (as a model failure would)."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.name, self.sample_rate_hz, self.max_phonemes = runner.name, runner.sample_rate_hz, runner.max_phonemes
        self.device_type = runner.device_type
        self.unknown_symbols, self.voice_names = runner.unknown_symbols, runner.voice_names
        self.vocabulary = runner.vocabulary
        self.warmup, self.opening_share, self.prime = runner.warmup, runner.opening_share, runner.prime

    def check_voice(self, spec: str) -> None:
        if spec == BROKEN_VOICE:
            raise RuntimeError("injected fault")
        self._runner.check_voice(spec)

    def synthesize(self, requests: Any, on_partial: Any = None, opening_share: float | None = None) -> Any:
        if any(POISON in r.phonemes for r in requests):
            raise RuntimeError("injected model failure")
        return self._runner.synthesize(requests, on_partial, opening_share)


def poisoned_loader(spec: ModelSpec) -> LoadedModel:
    loaded = load_model(spec)
    return LoadedModel(_PoisonedRunner(loaded.runner), loaded.make_request)


def offline_audio(runner: Any, phonemes: list[str], voice: str, speed: float = 1.0) -> np.ndarray:
    """Offline synthesis of the same segments, one at a time, concatenated (noise off)."""
    from rt_server.model.runner import SynthesisRequest

    parts = [runner.synthesize([SynthesisRequest(p, voice, speed, None)])[0].audio for p in phonemes]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


@dataclass
class Received:
    """Everything a raw client got: audio frames and events in arrival order, and how the socket closed."""

    items: list[bytes | dict[str, Any]]
    close_code: int | None
    close_reason: str | None

    @property
    def events(self) -> list[dict[str, Any]]:
        return [i for i in self.items if isinstance(i, dict)]

    @property
    def frames(self) -> list[bytes]:
        return [i for i in self.items if isinstance(i, bytes)]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


async def receive_until_closed(
    ws: Any,
    stop_after: str | Callable[[dict[str, Any]], bool] | None = None,
    *,
    idle_timeout_s: float | None = None,
) -> Received:
    """Read frames and events until the server closes (or until an event of type `stop_after`, or one the
    predicate `stop_after` accepts). With `idle_timeout_s`: TimeoutError when nothing arrives for that long."""
    from websockets.exceptions import ConnectionClosed

    def stop(event: dict[str, Any]) -> bool:
        return stop_after(event) if callable(stop_after) else event["type"] == stop_after

    items: list[bytes | dict[str, Any]] = []
    while True:
        try:
            message = await asyncio.wait_for(ws.recv(), idle_timeout_s)  # cancelling recv loses nothing
        except ConnectionClosed:
            break
        if isinstance(message, bytes):
            items.append(message)
        else:
            event = json.loads(message)
            items.append(event)
            if stop(event):
                break
    return Received(items, ws.close_code, ws.close_reason)
