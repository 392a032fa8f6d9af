"""The engine thread with a hand-made runner (plain numpy, no torch): delivery, failures, aborts, calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from rt_server import engine as engine_module
from rt_server.engine import EngineOverloadedError, EngineStats, LoadedModel, ModelEngine
from rt_server.pipeline.jobs import SegmentAudio, SegmentFailed, SegmentJob, SegmentOutcome
from rt_server.pipeline.scheduler import SchedulerConfig

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


@dataclass(frozen=True)
class _Result:
    audio: np.ndarray
    durations: np.ndarray
    offset: int = 0
    total_samples: int | None = None


class FakeRunner:
    """Audio of one duration frame per token, filled with the request's position in the batch + 1."""

    name = "fake"
    sample_rate_hz = 24_000
    max_phonemes = 510
    device_type = "cpu"

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str, float, int | None, int | None]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.primes = 0
        self.priming = threading.Event()  # set when a prime starts
        self.prime_gate = threading.Event()  # holds a prime while clear
        self.prime_gate.set()
        self.prime_error: Exception | None = None
        self.interrupted: list[bool] = []  # per prime: whether its `interrupt()` said stop when it ended

    def unknown_symbols(self, phonemes: str) -> list[str]:
        return [c for c in dict.fromkeys(phonemes) if c not in self.vocabulary()]

    def vocabulary(self) -> frozenset[str]:
        return frozenset("abcdefgh .,")

    def voice_names(self) -> list[str]:
        return ["v1", "v2"]

    def check_voice(self, spec: str) -> None:
        if spec not in self.voice_names():
            raise ValueError(f"unknown voice {spec!r}")

    def synthesize(self, requests: Sequence[Any], on_partial: Any = None, share: float | None = None) -> list[_Result]:
        self.gate.wait(10)
        self.batches.append(list(requests))
        if any("boom" in r[0] for r in requests):
            raise RuntimeError("injected failure")
        return [
            _Result(np.full(600 * (len(r[0]) + 2), i + 1, np.float32), np.ones(len(r[0]) + 2, np.int64))
            for i, r in enumerate(requests)
        ]

    def warmup(self) -> None:
        pass

    def prime(self, interrupt: Callable[[], bool] | None = None) -> bool:
        self.priming.set()
        self.prime_gate.wait(10)
        self.primes += 1
        if self.prime_error is not None:
            raise self.prime_error
        self.interrupted.append(interrupt is not None and interrupt())
        return True

    def opening_share(self) -> float:
        return 0.5


def _request(
    phonemes: str,
    voice: str,
    speed: float,
    seed: int | None,
    lead: int | None,
    trail: int | None,
    first_chunk: int | None,
) -> tuple[str, str, float, int | None, int | None]:
    assert lead is None and trail is None  # these jobs set no pause caps
    return (phonemes, voice, speed, seed, first_chunk)


def _job(session: str, seq: int, text: str = "abc") -> SegmentJob:
    return SegmentJob(session, seq, text, "v1", 1.0, seq == 0, 0.0)


class Inbox:
    def __init__(self) -> None:
        self.items: list[SegmentOutcome] = []
        self.arrived = asyncio.Event()

    def __call__(self, outcome: SegmentOutcome) -> None:
        self.items.append(outcome)
        self.arrived.set()

    async def wait_for(self, n: int) -> list[SegmentOutcome]:
        while len(self.items) < n:
            self.arrived.clear()
            await self.arrived.wait()
        return self.items


async def _engine(
    runner: FakeRunner, *, noise: bool = False, prime_after_idle_s: float | None = None, **config: Any
) -> ModelEngine:
    settings = {"max_wait_ms": 0.0, **config}
    engine = ModelEngine(
        "fake",
        lambda: LoadedModel(runner, _request),
        SchedulerConfig(**settings),
        noise=noise,
        prime_after_idle_s=prime_after_idle_s,
    )
    await engine.start()
    return engine


async def _stats_until(engine: ModelEngine, predicate: Callable[[EngineStats], bool]) -> None:
    """Until the stats the engine thread publishes satisfy `predicate` (at most 10 s)."""
    async with asyncio.timeout(10):
        while not predicate(engine.stats):  # noqa: ASYNC110 - polls another thread's state; no event to await
            await asyncio.sleep(0.005)


async def _settled(engine: ModelEngine, batches: int) -> None:
    """Until the engine thread has finished `batches` steps and published its stats after them."""
    await _stats_until(engine, lambda stats: stats.batches == batches and stats.running == 0)


async def test_delivers_each_sessions_outcomes_in_order() -> None:
    runner = FakeRunner()
    engine = await _engine(runner)
    a, b = Inbox(), Inbox()
    engine.open_session("a", a)
    engine.open_session("b", b)
    for seq in range(3):
        engine.submit(_job("a", seq))
        engine.submit(_job("b", seq, "de"))
    await a.wait_for(3)
    await b.wait_for(3)
    await engine.stop()
    assert [o.seq for o in a.items] == [0, 1, 2]
    assert [o.seq for o in b.items] == [0, 1, 2]
    assert all(isinstance(o, SegmentAudio) and len(o.audio) == 600 * 5 for o in a.items)
    assert all(req[3] is None for batch in runner.batches for req in batch)  # noise off: no seeds


async def test_a_failing_batch_fails_only_its_segments_and_the_engine_goes_on() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, max_batch_size=1)
    a, b = Inbox(), Inbox()
    engine.open_session("a", a)
    engine.open_session("b", b)
    engine.submit(_job("a", 0, "ab boom"))
    engine.submit(_job("b", 0))
    engine.submit(_job("a", 1))
    await a.wait_for(2)
    await b.wait_for(1)
    await engine.stop()
    assert isinstance(a.items[0], SegmentFailed)
    assert a.items[0].message == "synthesis failed"
    assert isinstance(a.items[1], SegmentAudio)
    assert isinstance(b.items[0], SegmentAudio)


async def test_a_failed_step_is_not_taken_into_the_cost_estimate() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, max_batch_size=1)
    a = Inbox()
    engine.open_session("a", a)
    engine.submit(_job("a", 0, "ab boom"))
    await a.wait_for(1)
    await _settled(engine, 1)
    assert engine.stats.seconds_per_cost is None  # the step raised: no estimate from it
    engine.submit(_job("a", 1))
    await a.wait_for(2)
    await _settled(engine, 2)
    await engine.stop()
    assert isinstance(a.items[0], SegmentFailed) and isinstance(a.items[1], SegmentAudio)
    rate = engine.stats.seconds_per_cost
    assert rate is not None and rate > 0


async def test_abort_between_steps_drops_queued_work() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, max_batch_size=1)
    a = Inbox()
    engine.open_session("a", a)
    runner.gate.clear()  # hold the first batch inside the model
    for seq in range(4):
        engine.submit(_job("a", seq))
    await _stats_until(engine, lambda stats: stats.running > 0)
    engine.abort("a")  # applied after the running step, before the next
    engine.submit(_job("a", 10))
    runner.gate.set()
    await a.wait_for(2)
    await asyncio.sleep(0.1)
    await engine.stop()
    assert [o.seq for o in a.items] == [0, 10]


async def test_repeated_aborts_and_primes_take_one_place_in_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that sends `clear` as fast as it can while the model is busy must not fill the engine's
    # queue and so fail every other session: aborts with nothing queued between them coalesce, as do
    # primes; closes are always taken, so a session's cleanup never fails.
    monkeypatch.setattr(engine_module, "MAX_QUEUED_COMMANDS", 8)
    runner = FakeRunner()
    engine = await _engine(runner, max_batch_size=1, prime_after_idle_s=0.0)
    a, b = Inbox(), Inbox()
    engine.open_session("a", a)
    engine.open_session("b", b)
    runner.gate.clear()
    engine.submit(_job("a", 0))
    await _stats_until(engine, lambda stats: stats.running > 0)
    for _ in range(1000):
        engine.abort("a")
        engine.prime()
    engine.submit(_job("a", 1))
    engine.abort("a")  # a segment came after the last abort: this one is queued, and drops it
    engine.submit(_job("b", 0))
    engine.submit(_job("a", 2))
    assert engine.queued_segments == 3  # on their way to the scheduler, counted already
    for seq in range(3, 5):  # 8 commands queued: one abort, one prime, an abort after a segment, 5 segments
        engine.submit(_job("b", seq))
    with pytest.raises(EngineOverloadedError):
        engine.submit(_job("b", 9))
    engine.close_session("b")  # the queue is full, and the close is still taken
    runner.gate.set()
    await a.wait_for(2)
    await _settled(engine, 2)
    await engine.stop()
    assert [o.seq for o in a.items] == [0, 2]
    assert b.items == []
    assert engine.stats.sessions == 1


async def test_a_session_that_fails_to_take_its_outcome_costs_the_others_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = FakeRunner()
    engine = await _engine(runner, max_batch_size=2)

    def broken(outcome: SegmentOutcome) -> None:
        raise RuntimeError("the session's bookkeeping broke")

    b = Inbox()
    engine.open_session("a", broken)
    engine.open_session("b", b)
    runner.gate.clear()
    engine.submit(_job("a", 0))
    engine.submit(_job("b", 0))
    runner.gate.set()
    await b.wait_for(1)
    await engine.stop()
    assert [len(batch) for batch in runner.batches] == [2]
    assert isinstance(b.items[0], SegmentAudio)
    assert "session a: its outcome could not be delivered" in caplog.text


async def test_closed_sessions_get_nothing_and_are_forgotten() -> None:
    runner = FakeRunner()
    engine = await _engine(runner)
    a = Inbox()
    engine.open_session("a", a)
    engine.close_session("a")
    engine.submit(_job("a", 0))
    b = Inbox()
    engine.open_session("b", b)
    engine.submit(_job("b", 0))
    await b.wait_for(1)
    await engine.stop()
    assert a.items == []
    assert engine.stats.sessions == 1


async def test_noise_on_seeds_every_request() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, noise=True)
    a = Inbox()
    engine.open_session("a", a)
    engine.submit(_job("a", 0))
    engine.submit(_job("a", 1))
    await a.wait_for(2)
    await engine.stop()
    seeds = [req[3] for batch in runner.batches for req in batch]
    assert all(isinstance(s, int) for s in seeds)
    assert seeds[-1] != seeds[-2]


async def test_model_info_voice_check_and_vocabulary_snapshot() -> None:
    engine = await _engine(FakeRunner())
    assert engine.voices == ("v1", "v2")
    assert engine.max_phonemes == 510
    assert await engine.check_voice("v2") is None
    assert await engine.check_voice("zz") == "unknown voice 'zz'"
    assert engine.unknown_symbols("abz c1z") == ["z", "1"]
    await engine.stop()


async def test_a_model_that_fails_to_load_fails_start() -> None:
    def broken() -> LoadedModel:
        raise FileNotFoundError("no weights at /nowhere")

    engine = ModelEngine("broken", broken, SchedulerConfig(), noise=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        await engine.start()
    assert not engine.ready
    await engine.stop()


class StreamingRunner(FakeRunner):
    """Sends the first half of a request that asks for a first chunk ahead (`on_partial`), then waits on
    `second` before returning the rest; above `oom_above` requests it runs out of memory after the openings."""

    def __init__(self, oom_above: int | None = None) -> None:
        super().__init__()
        self.second = threading.Event()
        self.second.set()
        self.oom_above = oom_above
        self.first_chunks: list[int | None] = []
        self.shares: list[float | None] = []

    def synthesize(self, requests: Sequence[Any], on_partial: Any = None, share: float | None = None) -> list[_Result]:
        self.first_chunks += [r[4] for r in requests]
        self.shares.append(share)
        whole = super().synthesize([r[:4] for r in requests])
        halves = [len(w.audio) // 2 if r[4] else 0 for w, r in zip(whole, requests, strict=True)]
        if on_partial is not None:
            for i, (w, half) in enumerate(zip(whole, halves, strict=True)):
                if half:
                    on_partial(i, _Result(w.audio[:half], w.durations, 0, len(w.audio)))
        if self.oom_above is not None and len(requests) > self.oom_above:
            raise RuntimeError("CUDA out of memory (injected)")
        self.second.wait(10)
        return [_Result(w.audio[half:], w.durations, half, len(w.audio)) for w, half in zip(whole, halves, strict=True)]


def _first_job(session: str, seq: int, text: str = "abcdef") -> SegmentJob:
    return SegmentJob(session, seq, text, "v1", 1.0, True, 0.0, first_chunk_frames=2)


async def test_a_first_chunk_is_delivered_before_its_batch_ends() -> None:
    runner = StreamingRunner()
    engine = await _engine(runner, max_batch_size=1)
    a = Inbox()
    engine.open_session("a", a)
    runner.second.clear()  # hold the batch after the opening went out
    engine.submit(_first_job("a", 0))
    engine.submit(_job("a", 1))  # no first chunk asked: whole
    (opening,) = await a.wait_for(1)
    assert engine.stats.running == 1  # the batch is still inside the model
    runner.second.set()
    await a.wait_for(3)
    await engine.stop()
    rest, whole = a.items[1:]
    assert isinstance(opening, SegmentAudio) and isinstance(rest, SegmentAudio) and isinstance(whole, SegmentAudio)
    total = 600 * 8
    assert (opening.seq, opening.offset, len(opening.audio), opening.total, opening.final) == (
        0,
        0,
        total // 2,
        total,
        False,
    )
    assert (rest.seq, rest.offset, len(rest.audio), rest.final) == (0, total // 2, total // 2, True)
    assert (whole.seq, whole.offset, whole.final) == (1, 0, True)
    assert runner.first_chunks == [2, None]


async def test_a_retried_batch_does_not_repeat_what_went_ahead() -> None:
    """Out of memory after the openings went out: the halves run again and send their openings again to the
    runner's callback; the engine passes on only the samples not yet delivered."""
    runner = StreamingRunner(oom_above=1)
    engine = await _engine(runner, max_batch_size=2, max_wait_ms=50.0)
    a, b = Inbox(), Inbox()
    engine.open_session("a", a)
    engine.open_session("b", b)
    engine.submit(_first_job("a", 0))
    engine.submit(_first_job("b", 0, "abcdefgh"))
    for inbox, total in ((a, 600 * 8), (b, 600 * 10)):
        parts = await inbox.wait_for(2)
        assert all(isinstance(p, SegmentAudio) for p in parts)
        audio = [p for p in parts if isinstance(p, SegmentAudio)]
        assert [(p.offset, len(p.audio)) for p in audio] == [(0, total // 2), (total // 2, total // 2)]
        assert np.concatenate([p.audio for p in audio]).shape == (total,)
    await asyncio.sleep(0.05)
    await engine.stop()
    assert len(a.items) == len(b.items) == 2
    assert [len(batch) for batch in runner.batches] == [2, 1, 1]
    assert runner.shares == [0.5, 0.5, 0.5]  # decided once for the step: the retries split where the first try did


async def test_an_opening_goes_ahead_only_when_no_other_session_waits() -> None:
    """Sending an opening ahead costs a second generator pass and starts the listener's clock earlier: the
    engine does it only when no other session has work waiting, else the first segment goes whole."""
    runner = StreamingRunner()
    engine = await _engine(runner, max_batch_size=1)
    x, b, c = Inbox(), Inbox(), Inbox()
    for name, inbox in (("x", x), ("b", b), ("c", c)):
        engine.open_session(name, inbox)
    runner.gate.clear()  # hold x's batch inside the model while b and c queue up
    engine.submit(_job("x", 0))
    await _stats_until(engine, lambda stats: stats.running > 0)
    engine.submit(_first_job("b", 0))
    engine.submit(_job("c", 0))
    await asyncio.sleep(0.05)
    runner.gate.set()
    await b.wait_for(1)
    await c.wait_for(1)
    engine.submit(_first_job("b", 1))  # nobody else waits now
    await b.wait_for(3)
    await engine.stop()
    assert runner.first_chunks == [None, None, None, 2]
    assert [(o.seq, isinstance(o, SegmentAudio) and o.final) for o in b.items] == [(0, True), (1, False), (1, True)]


async def test_a_prime_after_an_idle_spell_runs_once_and_segments_arriving_meanwhile_follow_it() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, prime_after_idle_s=0.3)
    a = Inbox()
    engine.open_session("a", a)
    await asyncio.sleep(0.4)  # idle since the warm-up
    runner.prime_gate.clear()
    engine.prime()
    engine.prime()  # taken with the first, or after it with the model no longer idle: no second prime
    await asyncio.to_thread(runner.priming.wait, 10)
    engine.submit(_job("a", 0))  # arrives while the prime runs: waits for it, then goes
    runner.prime_gate.set()
    await a.wait_for(1)
    await _settled(engine, 1)
    engine.prime()  # the model has just worked: not idle long enough
    engine.submit(_job("a", 1))
    await a.wait_for(2)
    await _settled(engine, 2)
    await engine.stop()
    assert runner.primes == engine.stats.primes == 1
    assert runner.interrupted == [True]  # the segment that arrived during it was what it gave way to
    assert [o.seq for o in a.items] == [0, 1] and all(isinstance(o, SegmentAudio) for o in a.items)


async def test_a_prime_gives_way_to_segments_and_stopping_not_to_other_sessions() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, prime_after_idle_s=0.0)
    engine.open_session("a", Inbox())
    runner.prime_gate.clear()
    engine.prime()
    await asyncio.to_thread(runner.priming.wait, 10)
    engine.open_session("b", Inbox())  # another session connects, and its turn begins
    engine.prime()
    runner.prime_gate.set()
    await _stats_until(engine, lambda stats: stats.primes >= 1)
    assert runner.interrupted[0] is False

    runner.priming.clear()
    runner.prime_gate.clear()
    await asyncio.sleep(0.05)
    engine.prime()
    await asyncio.to_thread(runner.priming.wait, 10)
    stopping = asyncio.create_task(engine.stop())  # stopped in the middle of a prime: it gives way
    await asyncio.sleep(0.05)
    runner.prime_gate.set()
    await stopping
    assert runner.interrupted[-1] is True


async def test_no_prime_while_a_segment_waits_to_be_batched() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, prime_after_idle_s=0.0, max_batch_size=2, max_wait_ms=300.0)
    a = Inbox()
    engine.open_session("a", a)
    engine.submit(_job("a", 0))  # not urgent: the step waits up to 300 ms for more work
    engine.prime()  # planned with the segment queued
    await a.wait_for(1)
    await _settled(engine, 1)
    await engine.stop()
    assert runner.primes == engine.stats.primes == 0


async def test_no_prime_while_segments_wait_or_when_priming_is_off() -> None:
    runner = FakeRunner()
    engine = await _engine(runner, max_batch_size=1, prime_after_idle_s=0.0)
    a = Inbox()
    engine.open_session("a", a)
    runner.gate.clear()  # hold the first step inside the model, with a second segment queued behind it
    engine.submit(_job("a", 0))
    engine.submit(_job("a", 1))
    await _stats_until(engine, lambda stats: stats.running > 0)
    engine.prime()  # applied between the steps, with segment 1 queued: the step goes first, no prime
    runner.gate.set()
    await a.wait_for(2)
    await _settled(engine, 2)
    assert runner.primes == 0
    engine.prime()  # now nothing waits (and any idle time is enough)
    await _stats_until(engine, lambda stats: stats.primes == 1)
    await engine.stop()

    assert await _primes_after_an_idle_turn(FakeRunner(), None) == (0, 0)  # the setting at 0
    gpu = FakeRunner()
    gpu.device_type = "cuda"  # the idle slow-down priming answers was measured on a CPU only
    assert await _primes_after_an_idle_turn(gpu, 0.0) == (0, 0)


async def _primes_after_an_idle_turn(runner: FakeRunner, prime_after_idle_s: float | None) -> tuple[int, int]:
    """(primes the runner ran, primes the engine counted) for a turn that begins after 0.1 s idle."""
    engine = await _engine(runner, prime_after_idle_s=prime_after_idle_s)
    engine.open_session("a", Inbox())
    await asyncio.sleep(0.1)
    engine.prime()
    engine.submit(_job("a", 0))
    await _settled(engine, 1)
    await engine.stop()
    return runner.primes, engine.stats.primes


async def test_a_failing_prime_is_logged_and_the_engine_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner()
    runner.prime_error = RuntimeError("injected prime failure")
    engine = await _engine(runner, prime_after_idle_s=0.0)
    a = Inbox()
    engine.open_session("a", a)
    engine.prime()
    await asyncio.to_thread(runner.priming.wait, 10)
    engine.submit(_job("a", 0))
    await a.wait_for(1)
    await engine.stop()
    assert isinstance(a.items[0], SegmentAudio)
    assert runner.primes == 1 and engine.stats.primes == 0  # it raised: not counted as done
    assert "priming failed" in caplog.text
