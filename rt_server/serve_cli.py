"""`rt-server serve` and `rt-server say` (registered into rt_server.cli, which configures logging)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import wave
from collections.abc import Mapping
from typing import Any

from rt_server.cli import add_model_arguments
from rt_server.settings import ModelSpec, Settings, SettingsError, setting_names, setting_type

DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the streaming server",
        description="Every setting is also read from RT_SERVER_<NAME> (flags win); see docs/configuration.md.",
    )
    serve.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="SPEC",
        help="a model to load, repeatable: NAME, or name=N,kind=kokoro|tiny,weights=..,config=..,voices=..,"
        "device=..,precision=..,compile=on|off,seed=.. (env RT_SERVER_MODELS, ';'-separated)",
    )
    # The single default model when no --model / RT_SERVER_MODELS is given (the same flags as `synth`).
    add_model_arguments(serve)
    for name in setting_names():
        flag = "--" + name.replace("_", "-")
        kind = setting_type(name)
        if kind == "bool":
            serve.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None)
        else:
            serve.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=f"({kind})")
    serve.set_defaults(handler=_serve)

    say = sub.add_parser("say", help="stream phonemes from a running server into a WAV file")
    say.add_argument("--phonemes", required=True)
    say.add_argument("--url", default=os.environ.get("RT_SERVER_URL", DEFAULT_URL))
    say.add_argument("--voice", default=None)
    say.add_argument("--speed", type=float, default=1.0)
    say.add_argument("--model", default=None)
    say.add_argument("--sample-rate", type=int, default=24_000)
    say.add_argument("--out", default="out.wav")
    say.set_defaults(handler=_say)


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in setting_names()}
    overrides["models"] = getattr(args, "models", None)
    if overrides["models"] is None and not env.get("RT_SERVER_MODELS") and hasattr(args, "weights"):
        overrides["models"] = [
            ModelSpec(
                name="kokoro",
                weights=args.weights or env.get("RT_SERVER_WEIGHTS"),
                config=args.config or env.get("RT_SERVER_CONFIG"),
                voices_dir=args.voices_dir or env.get("RT_SERVER_VOICES_DIR"),
                device=args.device,
                precision=args.precision,
                compile=args.compile,
            )
        ]
    return Settings.from_sources(env, overrides)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rt_server.app import create_app
    from rt_server.server import build_server

    server = build_server(create_app(settings), settings)
    server.run()
    return 0 if server.started else 3


def _say(args: argparse.Namespace) -> int:
    from rt_server.client import StreamError

    try:
        ttfa_s, frames, rate = asyncio.run(_say_async(args))
    except StreamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    pcm = b"".join(frames)
    with wave.open(args.out, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    seconds = len(pcm) / 2 / rate
    first = "no audio" if ttfa_s is None else f"{ttfa_s * 1000:.0f} ms"
    print(f"time to first audio: {first}; wrote {seconds:.2f} s to {args.out}")
    return 0


async def _say_async(args: argparse.Namespace) -> tuple[float | None, list[bytes], int]:
    from rt_server.client import StreamClient
    from rt_server.protocol import ErrorEvent

    frames: list[bytes] = []
    async with StreamClient.connect(
        args.url, voice=args.voice, speed=args.speed, model=args.model, sample_rate_hz=args.sample_rate
    ) as client:
        started = time.perf_counter()
        await client.send_phonemes(args.phonemes)
        await client.close()
        ttfa_s: float | None = None
        async for item in client:
            if isinstance(item, bytes):
                if ttfa_s is None:
                    ttfa_s = time.perf_counter() - started
                frames.append(item)
            elif isinstance(item, ErrorEvent):
                print(f"server error: {item.code.value}: {item.message}", file=sys.stderr)
        return ttfa_s, frames, client.ready.sample_rate_hz
