"""Faults on a real server: a failing batch, out of memory, abrupt disconnects at every stage, a dead engine
thread. Faults are injected around the real tiny model (tests/fault_injection.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from fault_injection import FAIL, HOLD, KILL, BatchRecord, Faults
from server_harness import TINY, TINY2, RunningServer, make_settings, offline_audio, receive_until_closed, start_server

pytestmark = pytest.mark.timeout(120)

# Equal lengths, so the scheduler's length bucketing puts them in one batch.
HELD = f"{HOLD} dˈæ."
POISONED = f"{FAIL} dˈæ."
TEXTS = ["hˈæ dˈæ.", "wˈʌ dˈæ.", "sˈɪ dˈæ.", "tˈuː dæ."]
LONG = " ".join(["wˈʌn tˈuː θɹˈiː.", "fˈɔːɹ fˈaɪv sˈɪks.", "sˈɛvən ˈeɪt nˈaɪn.", "tˈɛn ɪlˈɛvən."] * 3)


@pytest.fixture(scope="module")
def faults() -> Faults:
    return Faults()


@pytest.fixture(scope="module")
def server(faults: Faults) -> Iterator[RunningServer]:
    running = start_server(make_settings(max_batch_size=4), loader=faults.loader)
    yield running
    running.stop()


@pytest.fixture
def fresh(faults: Faults, server: RunningServer) -> Iterator[Faults]:
    """The faults reset, and the server idle."""
    faults.oom_above = None
    faults.batches.clear()
    faults.held.clear()
    faults._gate.clear()
    yield faults
    faults.release()  # never leave the engine held


@pytest.fixture(scope="module")
def runner() -> Any:
    from rt_server.model.runner import tiny_runner

    return tiny_runner(seed=0)


async def _open(server: RunningServer, **fields: Any) -> Any:
    ws = await websockets.connect(server.url, compression=None)
    await ws.send(json.dumps({"type": "start", **fields}))
    ready = json.loads(await ws.recv())
    assert ready["type"] == "ready", ready
    return ws


async def _say(ws: Any, text: str, flush_id: object = 1) -> None:
    await ws.send(json.dumps({"type": "phonemes", "text": text}))
    await ws.send(json.dumps({"type": "flush", "id": flush_id}))


async def _hold_the_engine(holder: Any, faults: Faults) -> None:
    """`holder`'s batch waits inside the model, so that other sessions' segments queue up. (Sessions are
    opened before: `start` checks the voice on the engine thread.)
    """
    await _say(holder, HELD)
    assert await asyncio.to_thread(faults.held.wait, 20)


async def _all_submitted(server: RunningServer, n: int) -> None:
    """Until `n` sessions have submitted their segment and flush (the engine applies them after the held step;
    its own statistics do not move while it is held).
    """
    await server.wait_for(lambda s: sum(x["tickets"] == 2 for x in s["sessions"].values()) == n)


def _errors(got: Any) -> list[str]:
    return [e["code"] for e in got.events if e["type"] == "error"]


@pytest.mark.asyncio
async def test_a_failing_batch_fails_exactly_its_sessions_and_the_engine_goes_on(
    server: RunningServer, fresh: Faults
) -> None:
    async with asyncio.timeout(90):
        holder = await _open(server)
        sessions = [await _open(server, alignment=True) for _ in range(3)]
        await _hold_the_engine(holder, fresh)
        for ws, text in zip(sessions, [POISONED, *TEXTS[:2]], strict=True):
            await _say(ws, text)
        await _all_submitted(server, 4)
        fresh.release()
        held_got = await receive_until_closed(holder, stop_after="flushed")
        first = await asyncio.gather(*(receive_until_closed(ws, stop_after="flushed") for ws in sessions))
        # the engine goes on: the same sessions, with new text
        for ws, text in zip(sessions, TEXTS[1:], strict=True):
            await _say(ws, text, 2)
        second = await asyncio.gather(*(receive_until_closed(ws, stop_after="flushed") for ws in sessions))
        for ws in [holder, *sessions]:
            await ws.close()
        ready, _ = await asyncio.to_thread(server.get, "/readyz")
    failed = [b for b in fresh.batches if b.outcome == "failed"]
    assert failed == [BatchRecord((POISONED, *TEXTS[:2]), "failed")]  # the three queued segments, one batch
    for got in first:  # each session of the failed batch: an error for its segment, no audio, and goes on
        assert _errors(got) == ["synthesis_failed"]
        assert not got.frames
        assert got.events[-1] == {"type": "flushed", "id": 1}
    assert _errors(held_got) == [] and held_got.frames  # the batch before it was not touched
    for got in second:
        assert _errors(got) == [] and got.frames
        assert got.events[-1] == {"type": "flushed", "id": 2}
    assert ready == 200


@pytest.mark.asyncio
async def test_out_of_memory_halves_the_batch_and_fails_nothing(
    server: RunningServer, fresh: Faults, runner: Any
) -> None:
    async with asyncio.timeout(90):
        holder = await _open(server)
        sessions = [await _open(server) for _ in TEXTS]
        await _hold_the_engine(holder, fresh)
        fresh.oom_above = 1  # any batch of two or more runs out of memory
        for ws, text in zip(sessions, TEXTS, strict=True):
            await _say(ws, text)
        await _all_submitted(server, 5)
        fresh.release()
        results = await asyncio.gather(*(receive_until_closed(ws, stop_after="flushed") for ws in sessions))
        await receive_until_closed(holder, stop_after="flushed")
        for ws in [holder, *sessions]:
            await ws.close()
        _, metrics = await asyncio.to_thread(server.get, "/metrics")
    sizes = [(len(b.phonemes), b.outcome) for b in fresh.batches]
    assert sizes == [(1, "ok"), (4, "oom"), (2, "oom"), (1, "ok"), (1, "ok"), (2, "oom"), (1, "ok"), (1, "ok")]
    for got, text in zip(results, TEXTS, strict=True):
        assert _errors(got) == []
        pcm = np.frombuffer(b"".join(got.frames), "<i2").astype(np.float32) / 32767
        np.testing.assert_allclose(pcm, np.clip(offline_audio(runner, [text], "af_test"), -1, 1), atol=3 / 32767)
    assert 'rt_oom_splits_total{model="tiny"} 3' in metrics


def _idle(state: dict[str, Any], baseline_tasks: int) -> bool:
    engine = state["engines"]["tiny"]
    return (
        not state["sessions"]
        and state["clients"] == 0
        and engine["open_sessions"] == 0
        and engine["sessions"] == 0
        and engine["queue_depth"] == 0
        and engine["running"] == 0
        and state["tasks"] <= baseline_tasks
    )


@pytest.mark.parametrize("stage", ["before_start", "in_synthesis", "in_flush", "in_sending", "in_close"])
@pytest.mark.asyncio
async def test_an_abrupt_disconnect_leaves_nothing_behind(server: RunningServer, fresh: Faults, stage: str) -> None:
    async with asyncio.timeout(90):
        baseline = await server.wait_for(lambda s: not s["sessions"] and s["engines"]["tiny"]["queue_depth"] == 0)
        if stage == "before_start":
            ws = await websockets.connect(server.url, compression=None)
            await server.wait_for(lambda s: len(s["sessions"]) == 1)
        elif stage == "in_synthesis":  # the session's batch is inside the model when the peer goes
            ws = await _open(server)
            await _say(ws, f"{HELD} {LONG}")
            assert await asyncio.to_thread(fresh.held.wait, 20)
        else:
            ws = await _open(server)
            await ws.send(json.dumps({"type": "phonemes", "text": LONG}))
            if stage == "in_close":
                await ws.send(json.dumps({"type": "close"}))
            else:
                await ws.send(json.dumps({"type": "flush", "id": "f"}))
            if stage == "in_sending":  # audio is streaming; a flush and more segments are pending
                assert isinstance(await ws.recv(), bytes)
            else:  # segments and the flush (or close) are queued, synthesis is under way
                await server.wait_for(lambda s: any(x["tickets"] > 1 for x in s["sessions"].values()))
        busy = await asyncio.to_thread(server.state)
        assert len(busy["sessions"]) == 1 and busy["tasks"] > baseline["tasks"]
        ws.transport.abort()  # no close handshake: the TCP connection just goes
        await server.wait_for(lambda s: not s["sessions"])
        fresh.release()  # a held batch finishes now, for a session that is gone
        state = await server.wait_for(lambda s: _idle(s, baseline["tasks"]))
    assert state["tasks"] == baseline["tasks"]
    if stage == "in_synthesis":
        assert [b.outcome for b in fresh.batches][:1] == ["ok"]  # its result came back and went nowhere


@pytest.mark.asyncio
async def test_a_dead_engine_thread_fails_its_sessions_and_reports_not_ready() -> None:
    faults = Faults()
    server = start_server(make_settings(models=(TINY, TINY2)), loader=faults.loader)
    try:
        async with asyncio.timeout(90):
            waiting = await _open(server)
            killer = await _open(server)
            await _say(waiting, f"{HELD} {LONG}")  # held in the model, more of it queued behind
            assert await asyncio.to_thread(faults.held.wait, 20)
            await _say(killer, f"{KILL} dˈæ.")
            faults.release()
            got = await asyncio.gather(receive_until_closed(waiting), receive_until_closed(killer))
            ready = await asyncio.to_thread(server.get, "/readyz")
            late = await websockets.connect(server.url, compression=None)  # a new session on the dead model
            await late.send(json.dumps({"type": "start"}))
            late_got = await receive_until_closed(late)
            other = await _open(server, model="tiny2")  # the other model's engine is unaffected
            await other.send(json.dumps({"type": "phonemes", "text": TEXTS[0]}))
            await other.send(json.dumps({"type": "close"}))
            other_got = await receive_until_closed(other)
            _, metrics = await asyncio.to_thread(server.get, "/metrics")
            state = await server.wait_for(lambda s: not s["sessions"])
    finally:
        faults.release()
        server.stop()
    internal = {"type": "error", "code": "internal", "message": "internal server error", "close_code": 1011}
    for result in [*got, late_got]:
        assert result.events[-1] == internal
        assert (result.close_code, result.close_reason) == (1011, "")
    assert ready[0] == 503
    assert json.loads(ready[1]) == {"ready": False, "models": {"tiny": False, "tiny2": True}}
    assert other_got.close_code == 1000 and other_got.frames and other_got.types() == ["done"]
    assert 'rt_model_ready{model="tiny"} 0' in metrics
    assert state["engines"]["tiny"]["open_sessions"] == 0
