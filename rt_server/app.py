"""The composition root: builds the engines, the session registry and the Starlette app with its routes.

The lifespan loads every configured model in its engine thread and warms it up before the server reports
ready; on shutdown it drains the sessions (finish within `shutdown_grace_s`, then close with 1001) and stops
the engines. The model package is imported here lazily, inside the loader, never at import time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from rt_server.access import AccessPolicy, ApiKeys
from rt_server.engine import BatchReport, LoadedModel, ModelEngine
from rt_server.guard import AccessGuard
from rt_server.metrics import Gauges, Metrics
from rt_server.pipeline.jobs import MS_PER_DURATION_FRAME
from rt_server.pipeline.registry import SessionRegistry
from rt_server.pipeline.scheduler import SchedulerConfig
from rt_server.pipeline.session_config import SessionConfig
from rt_server.process_memory import release_free_heap, resident_memory_bytes
from rt_server.settings import ModelSpec, Settings
from rt_server.ws_endpoint import EndpointContext, stream_endpoint

Loader = Callable[[ModelSpec], LoadedModel]
WEB_CLIENT_DIR = Path(__file__).resolve().parent / "web"


def load_model(spec: ModelSpec) -> LoadedModel:
    """The default loader (runs in the engine thread): the tiny test model or a Kokoro checkpoint."""
    from rt_server.model.runner import SynthesisRequest, load_runner, tiny_runner

    if spec.kind == "tiny":
        runner = tiny_runner(seed=spec.seed, name=spec.name)
    else:
        runner = load_runner(
            spec.name,
            config=spec.config,
            weights=spec.weights,
            voices_dir=spec.voices_dir,
            device=spec.device,
            precision=spec.precision,
            compile_kernels=spec.compile,
        )
    return LoadedModel(runner=runner, make_request=SynthesisRequest)


@dataclass
class ServerState:
    settings: Settings
    engines: dict[str, ModelEngine]
    registry: SessionRegistry
    metrics: Metrics
    ready: bool = False

    async def drain(self) -> None:
        """Stop admitting sessions and close the open ones gracefully (idempotent)."""
        await self.registry.drain(self.settings.shutdown_grace_s)


def session_config(settings: Settings) -> SessionConfig:
    pause_frames = max(1, round(settings.join_pause_ms / MS_PER_DURATION_FRAME))
    return SessionConfig(
        max_message_bytes=settings.max_message_bytes,
        max_pending_phonemes=settings.max_pending_phonemes,
        max_buffer_ms=settings.max_buffer_ms,
        stall_timeout_s=settings.stall_timeout_s,
        start_timeout_s=settings.start_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        idle_cut_ms=settings.idle_cut_ms,
        first_segment_min_phonemes=settings.first_segment_min_phonemes,
        short_first_segment=settings.short_first_segment,
        clause_min_phonemes=settings.clause_min_phonemes,
        join_pause_frames=pause_frames if settings.trim_pauses else None,
        first_chunk_frames=math.ceil(settings.first_chunk_ms / MS_PER_DURATION_FRAME) or None,
    )


def scheduler_config(settings: Settings) -> SchedulerConfig:
    return SchedulerConfig(
        max_batch_size=settings.max_batch_size or None,  # 0: by device
        max_batch_tokens=settings.max_batch_tokens,
        max_padding_waste=settings.max_padding_waste,
        max_wait_ms=settings.batch_wait_ms,
        urgent_within_ms=settings.urgent_within_ms,
        protect_playing=settings.protect_playing,
        protect_max_defer_ms=settings.protect_max_defer_ms,
        high_water_ms=settings.max_buffer_ms,
        low_water_ms=settings.buffer_low_water_ms,
    )


def access_policy(settings: Settings) -> AccessPolicy:
    """Keys and origins from the settings. Public without a key: /healthz and the static web client's files
    (the same bytes as the published source; the page asks for the key and passes it on).
    """
    public = {"/healthz"}
    if WEB_CLIENT_DIR.is_dir():
        files = [p.name for p in WEB_CLIENT_DIR.iterdir() if p.is_file()]
        public |= {"/", *(f"/{name}" for name in files)}
    return AccessPolicy(ApiKeys(settings.api_keys), frozenset(settings.allowed_origins), frozenset(public))


def create_app(settings: Settings, *, loader: Loader = load_model) -> Starlette:
    metrics = Metrics()

    def on_batch(report: BatchReport) -> None:
        metrics.on_batch(report.model, report.size, report.compute_s, report.audio_s, report.failed)
        metrics.on_oom_splits(report.model, report.oom_splits)
        metrics.on_protected(report.model, report.protected)

    engines = {
        spec.name: ModelEngine(
            spec.name,
            partial(loader, spec),
            scheduler_config(settings),
            noise=settings.noise,
            on_batch=on_batch,
            prime_after_idle_s=settings.prime_after_idle_ms / 1000.0 or None,
        )
        for spec in settings.models
    }
    registry = SessionRegistry(settings.max_sessions, settings.max_sessions_per_client)
    state = ServerState(settings, engines, registry, metrics)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            for engine in engines.values():
                await engine.start()
            state.ready = True
            yield
        finally:
            state.ready = False
            await state.drain()
            for engine in engines.values():
                await engine.stop()

    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/v1/voices", voices),
        Route("/v1/models", models),
        Route("/metrics", metrics_endpoint),
        WebSocketRoute("/v1/stream", stream_endpoint),
    ]
    if settings.debug_endpoints:
        routes.append(Route("/debug/state", debug_state))
    if WEB_CLIENT_DIR.is_dir():  # the browser client, when it is installed beside the package
        web = StaticFiles(directory=WEB_CLIENT_DIR, html=True)
        routes.append(Mount("/", app=_http_only(web), name="web"))
    app = Starlette(
        routes=routes, lifespan=lifespan, middleware=[Middleware(AccessGuard, policy=access_policy(settings))]
    )
    app.state.rt = state
    app.state.endpoint = EndpointContext(
        registry=state.registry,
        backends=engines,
        default_model=settings.default_model_name,
        session_config=session_config(settings),
        observer=metrics,
    )
    return app


def _http_only(app: ASGIApp) -> ASGIApp:
    """Static files answer HTTP only; a WebSocket to any other path is refused before the upgrade (403)."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        await app(scope, receive, send)

    return guarded


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.rt
    return state


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = _state(request)
    models = {name: engine.ready for name, engine in state.engines.items()}
    ready = state.ready and all(models.values()) and not state.registry.draining
    return JSONResponse({"ready": ready, "models": models}, status_code=200 if ready else 503)


async def voices(request: Request) -> Response:
    state = _state(request)
    name = request.query_params.get("model", state.settings.default_model_name)
    engine = state.engines.get(name)
    if engine is None:
        return JSONResponse({"error": f"unknown model {name!r}"}, status_code=404)
    if not engine.ready:
        return JSONResponse({"error": f"model {name!r} is not loaded"}, status_code=503)
    return JSONResponse({"model": name, "voices": list(engine.voices)})


async def models(request: Request) -> Response:
    state = _state(request)
    listed = []
    for name, engine in state.engines.items():
        entry: dict[str, object] = {"name": name, "ready": engine.ready}
        if engine.ready:
            info = engine.info
            entry |= {
                "sample_rate": info.sample_rate_hz,
                "max_phonemes": info.max_phonemes,
                "voices": len(info.voices),
            }
        listed.append(entry)
    return JSONResponse({"default": state.settings.default_model_name, "models": listed})


def _gauges(state: ServerState) -> Gauges:
    buffers = [s.buffered_ms for s in state.registry.sessions()]
    return Gauges(
        sessions_active=len(state.registry),
        sessions_draining=state.registry.draining,
        buffer_ms_total=sum(buffers),
        buffer_ms_max=max(buffers, default=0.0),
        event_loop_tasks=len(asyncio.all_tasks()),
        queue_depth={name: e.queued_segments for name, e in state.engines.items()},
        engine_sessions={name: e.stats.sessions for name, e in state.engines.items()},
        primes={name: e.stats.primes for name, e in state.engines.items()},
        models_ready={name: e.ready for name, e in state.engines.items()},
        resident_memory_bytes=resident_memory_bytes(),
    )


async def metrics_endpoint(request: Request) -> Response:
    state = _state(request)
    return PlainTextResponse(
        state.metrics.render(_gauges(state)), media_type="text/plain; version=0.0.4; charset=utf-8"
    )


def _collected() -> dict[str, int | None]:
    """With ?gc=1: after a garbage collection and handing free heap back, what is really held. A leak of Python
    objects shows in `gc_objects`, a native one in `rss_trimmed_bytes`; neither is hidden by the allocator."""
    gc.collect()
    objects = len(gc.get_objects())
    trimmed = resident_memory_bytes() if release_free_heap() else None
    return {"gc_objects": objects, "rss_trimmed_bytes": trimmed}


async def debug_state(request: Request) -> Response:
    """Internals for tests and soak runs (enabled by `debug_endpoints`): sessions, engines, live tasks."""
    state = _state(request)
    return JSONResponse(
        {
            "draining": state.registry.draining,
            "tasks": len(asyncio.all_tasks()),
            "rss_bytes": resident_memory_bytes(),
            **(_collected() if request.query_params.get("gc") == "1" else {}),
            "clients": state.registry.clients,
            "sessions": {s.session_id: s.snapshot() for s in state.registry.sessions()},
            "engines": {
                name: dataclasses.asdict(e.stats) | {"open_sessions": e.open_sessions}
                for name, e in state.engines.items()
            },
        }
    )
