"""rt_server.client against a real server, the `say` and `serve` commands, and settings from env and flags."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import RunningServer, make_settings, start_server

from rt_server.app import scheduler_config
from rt_server.cli import build_parser
from rt_server.client import StreamClient, StreamError
from rt_server.protocol import Done, ErrorCode, Flushed, SegmentInfo
from rt_server.serve_cli import settings_from_args
from rt_server.settings import ModelSpec, Settings, SettingsError

HELLO = "həlˈoʊ wˈɜːld."


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server(make_settings())
    yield running
    running.stop()


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_client_streams_a_session(server: RunningServer) -> None:
    async with asyncio.timeout(50), StreamClient.connect(server.url, alignment=True, frame_ms=40) as client:
        assert client.ready.model == "tiny"
        assert client.ready.frame_ms == 40
        await client.send_phonemes(HELLO)
        await client.flush("f1")
        items = []
        async for item in client:
            items.append(item)
            if isinstance(item, Flushed):
                break
        await client.clear()
        await client.send_phonemes("ðɪs ɪz ə tˈɛst.")
        await client.close()
        rest = [item async for item in client]
    assert isinstance(items[0], SegmentInfo)
    assert items[0].phonemes == HELLO
    assert items[-1] == Flushed("f1")
    frames = [i for i in items if isinstance(i, bytes)]
    assert sum(len(f) for f in frames) == round(items[0].duration_ms * 48)
    assert isinstance(rest[-1], Done)
    assert client.close_code == 1000


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_client_raises_when_refused(server: RunningServer) -> None:
    async with asyncio.timeout(50):
        with pytest.raises(StreamError) as info:
            async with StreamClient.connect(server.url, voice="nobody"):
                pass
    assert info.value.event is not None
    assert info.value.event.code is ErrorCode.UNKNOWN_VOICE
    assert info.value.close_code == 1008


@pytest.mark.timeout(60)
def test_say_writes_a_wav_and_prints_time_to_first_audio(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.wav"
    args = build_parser().parse_args(
        ["say", "--url", server.url, "--phonemes", HELLO, "--sample-rate", "16000", "--out", str(out)]
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "time to first audio: " in printed
    assert " ms; wrote " in printed
    with wave.open(str(out)) as wav:
        assert wav.getframerate() == 16000
        assert wav.getnchannels() == 1
        assert wav.getsampwidth() == 2
        assert wav.getnframes() > 16000 // 2


def test_say_reports_an_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    args = build_parser().parse_args(
        ["say", "--url", f"ws://127.0.0.1:{port}/v1/stream", "--phonemes", "a", "--out", str(tmp_path / "x.wav")]
    )
    assert args.handler(args) == 2
    assert "cannot reach" in capsys.readouterr().err


def test_settings_from_env_and_flags() -> None:
    env = {
        "RT_SERVER_PORT": "9000",
        "RT_SERVER_NOISE": "off",
        "RT_SERVER_MAX_BUFFER_MS": "3000",
        "RT_SERVER_MODELS": "tiny; name=big,weights=/w.pth,voices=/v,device=cpu,precision=fp16",
    }
    args = build_parser().parse_args(["serve", "--port", "9100", "--stall-timeout-s", "2.5", "--debug-endpoints"])
    settings = settings_from_args(args, env)
    assert settings.port == 9100  # flags win
    assert settings.noise is False
    assert settings.max_buffer_ms == 3000
    assert settings.stall_timeout_s == 2.5
    assert settings.debug_endpoints is True
    assert scheduler_config(settings).protect_max_defer_ms == 3000.0
    deferring = ["serve", "--protect-max-defer-ms", "250", "--no-protect-playing"]
    protect = scheduler_config(settings_from_args(build_parser().parse_args(deferring), {}))
    assert (protect.protect_max_defer_ms, protect.protect_playing) == (250.0, False)
    assert settings.models == (
        ModelSpec(name="tiny", kind="tiny"),
        ModelSpec(name="big", weights="/w.pth", voices_dir="/v", device="cpu", precision="fp16"),
    )
    assert settings.default_model_name == "tiny"
    args = build_parser().parse_args(["serve", "--model", "a", "--model", "name=b,kind=tiny,seed=3"])
    models = settings_from_args(args, {}).models
    assert models == (ModelSpec(name="a"), ModelSpec(name="b", kind="tiny", seed=3))
    # without RT_SERVER_MODELS, the single default model reads the same variables as `rt-server synth`
    legacy = settings_from_args(build_parser().parse_args(["serve"]), {"RT_SERVER_WEIGHTS": "/k.pth"})
    assert legacy.models == (ModelSpec(name="kokoro", weights="/k.pth"),)
    flags = ["serve", "--weights", "/f.pth", "--voices-dir", "/v", "--device", "cpu", "--precision", "bf16"]
    from_flags = settings_from_args(build_parser().parse_args(flags), {"RT_SERVER_WEIGHTS": "/k.pth"})
    assert from_flags.models == (
        ModelSpec(name="kokoro", weights="/f.pth", voices_dir="/v", device="cpu", precision="bf16"),
    )
    assert from_flags.models[0].compile is True  # compiled kernels by default when serving
    uncompiled = settings_from_args(build_parser().parse_args([*flags, "--no-compile"]), {})
    assert uncompiled.models[0].compile is False
    assert ModelSpec.parse("name=a,precision=auto,compile=off") == ModelSpec(name="a", compile=False)
    assert Settings().models[0].precision == "auto"
    assert ModelSpec.parse("name=a,precision=int8").precision == "int8"
    assert build_parser().parse_args(["serve", "--precision", "int8"]).precision == "int8"
    with pytest.raises(SettingsError, match="precision must be one of"):
        ModelSpec.parse("name=a,precision=int4")
    # one-shot synthesis does not compile unless asked to
    assert build_parser().parse_args(["synth", "--phonemes", "a"]).compile is False
    assert build_parser().parse_args(["synth", "--phonemes", "a", "--compile"]).compile is True


@pytest.mark.parametrize(
    "env",
    [
        {"RT_SERVER_PORT": "eighty"},
        {"RT_SERVER_MAX_SESSIONS": "0"},
        {"RT_SERVER_NOISE": "maybe"},
        {"RT_SERVER_BUFFER_LOW_WATER_MS": "5000"},
        {"RT_SERVER_MODELS": "name=a,colour=red"},
        {"RT_SERVER_MODELS": "a;a"},
        {"RT_SERVER_DEFAULT_MODEL": "zzz"},
        {"RT_SERVER_PROTECT_MAX_DEFER_MS": "-1"},
        {"RT_SERVER_PROTECT_MAX_DEFER_MS": "nan"},
        {"RT_SERVER_STALL_TIMEOUT_S": "inf"},
    ],
)
def test_bad_settings_fail_loudly(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_sources(env)


@pytest.mark.timeout(120)
def test_serve_runs_until_sigterm_and_exits_0(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "RT_SERVER_NOISE": "off"}
    process = subprocess.Popen(
        [sys.executable, "-m", "rt_server", "serve", "--model", "tiny", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
