"""`prime_after_idle_ms`: a turn's first words, arriving while the model sits idle, have the engine warm it up
(`ModelRunner.prime`) before the turn's first segment is cut. Through a real server with the tiny model, and
the runner's prime itself."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import websockets
from server_harness import make_settings, receive_until_closed, start_server

from rt_server.settings import Settings, SettingsError

pytestmark = pytest.mark.timeout(120)

FIRST, REST = "ðə ", "kwˈɪk bɹˈWn fˈɑːks."


def _settings(prime_after_idle_ms: float) -> Settings:
    # No idle cut: on a slow machine a wait between two words must not make the first word a segment of its own.
    return make_settings(first_segment_min_phonemes=8, prime_after_idle_ms=prime_after_idle_ms, idle_cut_ms=10_000)


def _primes(state: dict[str, Any]) -> int:
    primes: int = state["engines"]["tiny"]["primes"]
    return primes


async def _turn(ws: Any, *parts: str) -> bytes:
    """Send `parts` as messages, then flush; the turn's audio once `flushed` arrives."""
    for text in parts:
        await ws.send(json.dumps({"type": "phonemes", "text": text}))
    await ws.send(json.dumps({"type": "flush", "id": "f"}))
    audio = b""
    while True:
        message = await ws.recv()
        if isinstance(message, bytes):
            audio += message
        elif json.loads(message)["type"] == "flushed":
            return audio


@pytest.mark.asyncio
async def test_a_turn_that_begins_while_the_model_idles_primes_it_once() -> None:
    server = start_server(_settings(50))
    try:
        async with asyncio.timeout(60), websockets.connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "encoding": "pcm_f32le"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            await asyncio.sleep(0.2)  # the model idles past 50 ms after its warm-up
            # The turn's first word is not a segment yet (8 phonemes at least): the engine primes the model.
            await ws.send(json.dumps({"type": "phonemes", "text": FIRST}))
            await server.wait_for(lambda s: _primes(s) == 1)
            await _turn(ws, REST)  # the rest of the turn: no new turn begins, no prime
            assert _primes(server.state()) == 1
            await asyncio.sleep(0.2)
            await ws.send(json.dumps({"type": "phonemes", "text": FIRST}))  # after `flush`, a new turn: primed again
            await server.wait_for(lambda s: _primes(s) == 2)
            await _turn(ws, REST)
            assert _primes(server.state()) == 2
            await ws.send(json.dumps({"type": "close"}))
            got = await receive_until_closed(ws)
        assert got.close_code == 1000
        _, metrics = await asyncio.to_thread(server.get, "/metrics")
        assert 'rt_primes_total{model="tiny"} 2' in metrics.splitlines()
    finally:
        await asyncio.to_thread(server.stop)


async def _audio_of_two_turns(prime_after_idle_ms: float) -> tuple[bytes, int]:
    server = start_server(_settings(prime_after_idle_ms))
    try:
        async with asyncio.timeout(60), websockets.connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "encoding": "pcm_f32le"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            audio = b""
            for turn in range(2):
                await asyncio.sleep(0.1)
                await ws.send(json.dumps({"type": "phonemes", "text": FIRST}))
                if prime_after_idle_ms:
                    await server.wait_for(lambda s, n=turn + 1: _primes(s) == n)
                audio += await _turn(ws, REST)
            return audio, _primes(server.state())
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.asyncio
async def test_priming_changes_no_audio_and_zero_turns_it_off() -> None:
    primed, primes = await _audio_of_two_turns(50)
    plain, none = await _audio_of_two_turns(0)
    assert (primes, none) == (2, 0)
    assert len(plain) > 0
    np.testing.assert_array_equal(np.frombuffer(primed, "<f4"), np.frombuffer(plain, "<f4"))


def test_the_runner_primes_with_the_models_front_and_keeps_no_state() -> None:
    import torch

    from rt_server.model.runner import SynthesisRequest, tiny_runner

    runner = tiny_runner(seed=0)
    request = SynthesisRequest("ðə kwˈɪk bɹˈWn.", "af_test")
    before = runner.synthesize([request])[0].audio
    front: list[int] = []  # tokens ALBERT saw
    generator: list[int] = []
    model = runner.model
    hooks = [
        model.bert.register_forward_hook(lambda m, args, out: front.append(out.shape[1])),
        model.decoder.generator.conv_post.register_forward_hook(lambda m, args, out: generator.append(1)),
    ]
    runner.prime()
    runner.prime()
    for hook in hooks:
        hook.remove()
    assert front == [10, 10] and generator == []  # "ðə kwˈɪk" and its two boundary tokens; no audio made
    np.testing.assert_array_equal(runner.synthesize([request])[0].audio, before)
    assert not torch.is_inference_mode_enabled()


def test_a_prime_gives_way_between_the_fronts_parts() -> None:
    from rt_server.model.runner import tiny_runner

    runner = tiny_runner(seed=0)
    model = runner.model
    ran: list[str] = []
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: ran.append(name))
        for name, module in (
            ("albert", model.bert),
            ("durations", model.predictor.text_encoder),
            ("text", model.text_encoder),
        )
    ]
    layers: list[int] = []  # passes of ALBERT's shared layer (2 in the tiny config)
    layer = model.bert.encoder.albert_layer_groups[0].albert_layers[0]
    hooks.append(layer.register_forward_hook(lambda *_: layers.append(1)))
    # after each of ALBERT's layers, after ALBERT, then stop after the duration encoder
    answers = iter([False, False, False, True])
    assert runner.prime(lambda: next(answers)) is False
    assert (ran, len(layers)) == (["albert", "durations"], 2)
    ran.clear()
    layers.clear()
    assert runner.prime(lambda: True) is False  # a segment waiting already: it waits for one layer, not ALBERT
    assert (ran, len(layers)) == ([], 1)
    ran.clear()
    assert runner.prime(lambda: False) is True
    assert ran == ["albert", "durations", "text"]
    for hook in hooks:
        hook.remove()


def test_the_setting() -> None:
    assert Settings().prime_after_idle_ms == 200
    assert Settings.from_sources({"RT_SERVER_PRIME_AFTER_IDLE_MS": "0"}).prime_after_idle_ms == 0
    with pytest.raises(SettingsError, match="prime_after_idle_ms must not be negative"):
        Settings(prime_after_idle_ms=-1)
