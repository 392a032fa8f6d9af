"""The engine of one model: an executor thread that owns the model and runs what the scheduler plans.

The thread loops: apply commands (open, submit, abort, consumed reports, calls), plan with the pure scheduler,
run one batch, post the outcomes to the event loop as plain numpy data. Commands are applied between steps, so
a `clear` or a disconnect (an abort) takes effect before the next batch. The thread never waits on a session:
results go out through `loop.call_soon_threadsafe`, and sessions bound their own buffers, which the scheduler
respects through consumed reports.

The model is loaded in the thread itself (`load` is called there), so nothing here imports torch; the lifespan
passes a loader that imports `rt_server.model` lazily.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from rt_server.pipeline.jobs import (
    SOURCE_SAMPLE_RATE_HZ,
    Delivery,
    EngineFailed,
    SegmentAudio,
    SegmentFailed,
    SegmentJob,
    SegmentOutcome,
)
from rt_server.pipeline.oom import run_in_halves
from rt_server.pipeline.scheduler import Batch, Scheduler, SchedulerConfig, Wait

log = logging.getLogger(__name__)

T = TypeVar("T")

# Commands waiting for the engine thread. Sessions bound what they submit (pending phonemes and tickets), so
# this is far above normal use: 65536 commands of ~200 B is ~13 MiB at worst. Beyond it `submit` raises.
MAX_QUEUED_COMMANDS: Final = 65_536


def _vocabulary(runner: ModelRunnerLike) -> frozenset[str]:
    """A plain snapshot of the vocabulary, taken once at load, so validation needs no engine thread."""
    return frozenset(runner.vocabulary())


class SynthesisResultLike(Protocol):
    @property
    def audio(self) -> npt.NDArray[Any]: ...
    @property
    def durations(self) -> npt.NDArray[Any]: ...
    @property
    def offset(self) -> int: ...
    @property
    def total_samples(self) -> int | None: ...


# Called by a runner, on the engine thread, with a request's index in the batch and the opening of its audio.
OnPartial = Callable[[int, SynthesisResultLike], None]


class ModelRunnerLike(Protocol):
    """What the engine needs of `rt_server.model.runner.ModelRunner` (not thread-safe: one thread calls
    it).
    """

    name: str
    sample_rate_hz: int
    max_phonemes: int
    device_type: str  # "cpu", "cuda": decides the batch size when the setting leaves it open

    def unknown_symbols(self, phonemes: str) -> list[str]: ...
    def vocabulary(self) -> frozenset[str]: ...
    def voice_names(self) -> list[str]: ...
    def check_voice(self, spec: str) -> None: ...
    def synthesize(
        self, requests: Sequence[Any], on_partial: OnPartial | None = None, opening_share: float | None = None
    ) -> Sequence[SynthesisResultLike]:
        """One result per request. With `on_partial`, requests that ask for a first chunk may have their
        opening (at least `opening_share` of their audio; None: the runner's own choice) passed to it before
        the batch is done; their results then hold the rest."""
        ...

    def opening_share(self) -> float:
        """The share of a segment's audio an opening needs at this runner's measured speed."""
        ...

    def warmup(self) -> None: ...

    def prime(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """Run a short piece of work that leaves the model warm for the next request, stopping early once
        `interrupt()` is true; returns whether it ran to the end."""
        ...


# Builds the runner's request type:
# (phonemes, voice, speed, seed, max_lead_frames, max_trail_frames, first_chunk_frames) -> SynthesisRequest.
RequestFactory = Callable[[str, str, float, int | None, int | None, int | None, int | None], Any]


@dataclass(frozen=True)
class LoadedModel:
    runner: ModelRunnerLike
    make_request: RequestFactory


@dataclass(frozen=True)
class ModelInfo:
    """A plain snapshot of a loaded model, readable from the event loop."""

    name: str
    sample_rate_hz: int
    max_phonemes: int
    voices: tuple[str, ...]
    vocabulary: frozenset[str]


@dataclass(frozen=True)
class BatchReport:
    """What one step did, for metrics."""

    model: str
    size: int
    tokens: int
    compute_s: float
    audio_s: float
    failed: bool  # some of its segments failed
    oom_splits: int = 0  # times a part of it ran out of memory and was split in halves
    protected: int = 0  # segments run ahead of a new turn's first segment to keep a listener from running dry


@dataclass(frozen=True)
class EngineStats:
    queue_depth: int = 0
    sessions: int = 0
    batches: int = 0
    running: int = 0  # segments in the batch running now
    seconds_per_cost: float | None = None  # the scheduler's estimate of a step's cost (`protect_playing`)
    primes: int = 0  # primes run for a turn after an idle spell, cut short or not (`prime_after_idle_s`)


class EngineOverloadedError(RuntimeError):
    """More than MAX_QUEUED_COMMANDS commands are waiting for the engine thread."""


class EngineStoppedError(RuntimeError):
    """The engine thread is not running (stopped, or died of an unexpected error)."""


@dataclass(frozen=True)
class _Open:
    session_id: str


@dataclass(frozen=True)
class _Close:
    session_id: str


@dataclass(frozen=True)
class _Abort:
    session_id: str


@dataclass(frozen=True)
class _Prime:
    """A session's turn has begun: its first segment is on the way."""


@dataclass(frozen=True)
class _Call:
    fn: Callable[[ModelRunnerLike], Any]
    future: concurrent.futures.Future[Any]


_Command = _Open | _Close | _Abort | _Prime | SegmentJob | _Call


class _Inbox:
    """Commands for the engine thread; consumed reports are coalesced per session (latest wins), as are a
    session's aborts with nothing queued between them and primes (one waiting is enough).

    Bound: MAX_QUEUED_COMMANDS for segments, calls and opens; closes and aborts are always taken (a session's
    cleanup must not fail), and are bounded by the sessions and by the segments between aborts; at most one
    prime waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._commands: deque[_Command] = deque()
        self._consumed: dict[str, float] = {}  # bound: one entry per open session
        self._aborted: set[str] = set()  # sessions whose last queued command is an abort
        self._prime_queued = False
        self.stopping = False
        self.closed: str | None = None  # why the thread is gone, once it is

    def put(self, command: _Command) -> None:
        with self._cond:
            if self.closed is not None:
                if isinstance(command, _Call):
                    raise EngineStoppedError(self.closed)
                return  # the sessions it concerns are failed, or are about to be
            if isinstance(command, _Abort):
                if command.session_id in self._aborted:
                    return  # nothing queued for it since its last abort
                self._aborted.add(command.session_id)
            elif isinstance(command, _Prime):
                if self._prime_queued:
                    return
                self._prime_queued = True
            elif not isinstance(command, _Close) and len(self._commands) >= MAX_QUEUED_COMMANDS:
                raise EngineOverloadedError("engine command queue is full")
            if isinstance(command, SegmentJob | _Open | _Close):
                self._aborted.discard(command.session_id)
            self._commands.append(command)
            self._cond.notify()

    def report(self, session_id: str, consumed_ms: float) -> None:
        with self._cond:
            if self.closed is not None:
                return
            self._consumed[session_id] = max(consumed_ms, self._consumed.get(session_id, 0.0))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify()

    def close(self, reason: str) -> None:
        """For good (the thread is gone): refuse further commands and fail the calls still waiting."""
        with self._cond:
            self.stopping = True
            self.closed = reason
            commands = list(self._commands)
            self._commands.clear()
        _fail_calls(commands, reason)

    def queued_segments(self) -> int:
        """Segments submitted and not yet taken by the engine thread."""
        with self._cond:
            return sum(isinstance(c, SegmentJob) for c in self._commands)

    def waiting(self) -> bool:
        """Whether a segment or a call is waiting, or the engine is stopping: what a prime gives way to (other
        sessions' opens, closes and primes do not cut it short)."""
        with self._cond:
            return self.stopping or any(isinstance(c, SegmentJob | _Call) for c in self._commands)

    def take(self, timeout_s: float | None) -> tuple[list[_Command], dict[str, float]]:
        """Everything waiting; blocks up to `timeout_s` (None: until something arrives) when nothing is."""
        with self._cond:
            if not self._commands and not self._consumed and not self.stopping and timeout_s != 0:
                self._cond.wait(timeout_s)
            commands, consumed = list(self._commands), self._consumed
            self._commands.clear()
            self._consumed = {}
            self._aborted.clear()
            self._prime_queued = False
            return commands, consumed


Deliver = Callable[[Delivery], None]


class ModelEngine:
    """One model, its executor thread and its scheduler. Methods are called from the event loop."""

    def __init__(
        self,
        name: str,
        load: Callable[[], LoadedModel],
        scheduler_config: SchedulerConfig,
        *,
        noise: bool,
        on_batch: Callable[[BatchReport], None] | None = None,
        prime_after_idle_s: float | None = None,
    ) -> None:
        """`prime_after_idle_s`: a `prime` that finds the model idle at least this long, with no segment
        queued, runs `runner.prime()`, which gives way to a segment that arrives meanwhile (None: never)."""
        self.name = name
        self._load = load
        self._scheduler_config = scheduler_config
        self._noise = noise
        self._on_batch = on_batch
        self._prime_after_idle_s = prime_after_idle_s
        self._inbox = _Inbox()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deliver: dict[str, Deliver] = {}  # event-loop side: open sessions
        self._info: ModelInfo | None = None
        self.stats = EngineStats()  # replaced (never mutated) by the engine thread

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> ModelInfo:
        """Start the thread, load and warm the model there; returns once it is ready (raises if loading
        fails).
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        ready: concurrent.futures.Future[ModelInfo] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"engine-{self.name}", daemon=True)
        self._thread.start()
        self._info = await asyncio.wrap_future(ready)
        return self._info

    async def stop(self) -> None:
        """Stop after the running step; waits for the thread to end."""
        self._inbox.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    @property
    def ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive() and self._inbox.closed is None
        return self._info is not None and alive

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        return self._info

    # -- the session-facing API (see rt_server.pipeline.session.SynthesisBackend) ------------------------

    @property
    def max_phonemes(self) -> int:
        return self.info.max_phonemes

    @property
    def voices(self) -> tuple[str, ...]:
        return self.info.voices

    def unknown_symbols(self, text: str) -> list[str]:
        vocabulary = self.info.vocabulary
        return [c for c in dict.fromkeys(text) if c not in vocabulary]

    async def check_voice(self, spec: str) -> str | None:
        """None if `spec` names a voice or a valid blend, else the runner's message. A plain voice name is
        answered from the snapshot at once; a blend is checked on the engine thread, between steps.
        """
        if spec in self.info.voices:
            return None

        def check(runner: ModelRunnerLike) -> str | None:
            try:
                runner.check_voice(spec)
            except ValueError as exc:  # VoiceError is a ValueError
                return str(exc)
            return None

        result: str | None = await self.call(check)
        return result

    async def call(self, fn: Callable[[ModelRunnerLike], T]) -> T:
        """Run `fn(runner)` on the engine thread between steps; raises `EngineStoppedError` once the thread is
        gone.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def open_session(self, session_id: str, deliver: Deliver) -> None:
        self._deliver[session_id] = deliver
        if self._inbox.closed is not None:  # the thread died: fail it soon, as the others were
            asyncio.get_running_loop().call_soon(self._fail_sessions, session_id)
            return
        self._inbox.put(_Open(session_id))

    def close_session(self, session_id: str) -> None:
        """Forget the session: its queued work is dropped, results still running are discarded."""
        if self._deliver.pop(session_id, None) is not None:
            self._inbox.put(_Close(session_id))

    def submit(self, job: SegmentJob) -> None:
        self._inbox.put(job)

    def abort(self, session_id: str) -> None:
        self._inbox.put(_Abort(session_id))

    def prime(self) -> None:
        """A turn has begun and its first segment is not cut yet. If the model has been idle for
        `prime_after_idle_s`, the engine runs `runner.prime()` now, while the rest of the segment arrives: on
        a CPU left idle for a few hundred milliseconds the next segment's front ran at half speed (its caches
        cold), and this spends that cost before the segment arrives instead of after (docs/performance.md)."""
        if self._prime_after_idle_s is not None:
            self._inbox.put(_Prime())  # one waiting is enough: never refused, never more than one

    def report_consumed(self, session_id: str, consumed_ms: float) -> None:
        self._inbox.report(session_id, consumed_ms)

    @property
    def open_sessions(self) -> int:
        return len(self._deliver)

    @property
    def queued_segments(self) -> int:
        """Segments waiting for the model: in the scheduler's queues and on their way to them."""
        return self.stats.queue_depth + self._inbox.queued_segments()

    def _dispatch(self, outcomes: list[SegmentOutcome], report: BatchReport | None) -> None:
        """On the event loop: hand each outcome to its session, if it is still open. One session's failure to
        take its outcome costs the others nothing."""
        for outcome in outcomes:
            deliver = self._deliver.get(outcome.session_id)
            if deliver is not None:
                try:
                    deliver(outcome)
                except Exception:
                    log.exception("session %s: its outcome could not be delivered", outcome.session_id)
        if report is not None and self._on_batch is not None:
            self._on_batch(report)

    def _fail_sessions(self, only: str | None = None) -> None:
        """On the event loop, after the engine thread died: every open session (or `only` that one) fails
        (`internal`, 1011)."""
        for session_id, deliver in list(self._deliver.items()):
            if only is None or session_id == only:
                deliver(EngineFailed(session_id))

    # -- the engine thread -------------------------------------------------------------------------------

    def _run(self, ready: concurrent.futures.Future[ModelInfo]) -> None:
        try:
            loaded = self._load()
            loaded.runner.warmup()
            runner = loaded.runner
            info = ModelInfo(
                name=self.name,
                sample_rate_hz=runner.sample_rate_hz,
                max_phonemes=runner.max_phonemes,
                voices=tuple(runner.voice_names()),
                vocabulary=_vocabulary(runner),
            )
            if info.sample_rate_hz != SOURCE_SAMPLE_RATE_HZ:
                raise ValueError(f"model {self.name!r} runs at {info.sample_rate_hz} Hz, expected 24000")
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(info)
        try:
            self._serve(loaded)
        except BaseException:
            # Not re-raised: the thread ends here either way, and the sessions must not wait for it. The
            # engine reports not ready from now on (the thread is not alive).
            log.exception("engine %s stopped by an unexpected error", self.name)
            self._inbox.close(f"engine {self.name} stopped by an unexpected error")
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is going away
                self._loop.call_soon_threadsafe(self._fail_sessions)

    def _serve(self, loaded: LoadedModel) -> None:
        config = self._scheduler_config.for_device(loaded.runner.device_type)
        log.info(
            "engine %s: batches of up to %s segments (%s)", self.name, config.max_batch_size, loaded.runner.device_type
        )
        scheduler = Scheduler(config)
        rng = np.random.default_rng()  # seeds for the sine-source noise when `noise` is on
        timeout_s: float | None = None
        batches = primes = 0
        on_cpu = loaded.runner.device_type == "cpu"  # where the idle slow-down that priming answers was measured
        busy_until = time.monotonic()  # when the model last stopped working

        def publish(running: int) -> None:
            self.stats = EngineStats(
                scheduler.queue_depth, scheduler.num_sessions, batches, running, scheduler.seconds_per_cost, primes
            )

        while True:
            commands, consumed = self._inbox.take(timeout_s)
            if self._inbox.stopping:
                self._inbox.close(f"engine {self.name} stopped")
                _fail_calls(commands, f"engine {self.name} stopped")
                return
            primed = any(isinstance(command, _Prime) for command in commands)
            for command in commands:
                self._apply(scheduler, loaded.runner, command)
            for session_id, consumed_ms in consumed.items():
                scheduler.report_consumed(session_id, consumed_ms)
            now = time.monotonic()
            plan = scheduler.plan(now)
            if isinstance(plan, Batch):
                publish(len(plan.jobs))
                self._run_batch(scheduler, loaded, plan.jobs, rng, plan.protected)
                batches += 1
                busy_until = time.monotonic()
                timeout_s = 0.0
            elif primed and on_cpu and not scheduler.queue_depth and self._idle_enough(now - busy_until):
                if self._prime(loaded.runner):  # nothing to run: it stops between parts for a segment
                    primes += 1
                busy_until = time.monotonic()
                timeout_s = 0.0  # plan again at once
            elif isinstance(plan, Wait):
                timeout_s = max(0.0, plan.until - now)
            else:
                timeout_s = None
            publish(0)

    def _idle_enough(self, idle_s: float) -> bool:
        return self._prime_after_idle_s is not None and idle_s >= self._prime_after_idle_s

    def _prime(self, runner: ModelRunnerLike) -> bool:
        started = time.perf_counter()
        try:
            finished = runner.prime(self._inbox.waiting)  # gives way to a segment, a call or shutdown
        except Exception:  # only a warm-up: the segment itself will say whether the model works
            log.warning("model %s: priming failed", self.name, exc_info=True)
            return False
        elapsed_ms = 1000 * (time.perf_counter() - started)
        log.debug("model %s: primed in %.0f ms%s", self.name, elapsed_ms, "" if finished else " (cut short)")
        return True

    def _apply(self, scheduler: Scheduler, runner: ModelRunnerLike, command: _Command) -> None:
        if isinstance(command, SegmentJob):
            scheduler.submit(command)
        elif isinstance(command, _Open):
            scheduler.open_session(command.session_id)
        elif isinstance(command, _Close):
            scheduler.close_session(command.session_id)
        elif isinstance(command, _Abort):
            scheduler.abort(command.session_id)
        elif isinstance(command, _Prime):
            return  # `_serve` decides once the step is planned
        elif command.future.set_running_or_notify_cancel():
            try:
                command.future.set_result(command.fn(runner))
            except Exception as exc:
                command.future.set_exception(exc)

    def _run_batch(
        self,
        scheduler: Scheduler,
        loaded: LoadedModel,
        jobs: tuple[SegmentJob, ...],
        rng: np.random.Generator,
        protected: int = 0,
    ) -> None:
        seeds = {job: int(rng.integers(2**31)) if self._noise else None for job in jobs}
        delivered: dict[SegmentJob, int] = {}  # samples already sent ahead, per job (kept across OOM retries)
        sent_at: dict[SegmentJob, float] = {}  # when the first of them went
        # An opening sent ahead costs a second generator pass and starts the listener's clock earlier; when
        # another session is waiting for the model, that would be paid in its underruns: the segment goes whole.
        ahead = not scheduler.others_waiting({j.session_id for j in jobs})
        # Decided once for the step: a retry after running out of memory then splits where the first try did.
        share = loaded.runner.opening_share() if ahead else None

        def run(part: Sequence[SegmentJob]) -> list[SegmentAudio]:
            requests = [
                loaded.make_request(
                    j.phonemes,
                    j.voice,
                    j.speed,
                    seeds[j],
                    j.max_lead_frames,
                    j.max_trail_frames,
                    j.first_chunk_frames if ahead else None,
                )
                for j in part
            ]

            def on_partial(index: int, result: SynthesisResultLike) -> None:
                job = part[index]
                audio = _plain(job, result, delivered.get(job, 0))
                if len(audio.audio):
                    delivered[job] = audio.offset + len(audio.audio)
                    sent_at.setdefault(job, time.monotonic())
                    self._post([audio], None)
                    log.debug(
                        "model %s: opening of %.2f s sent after %.0f ms",
                        self.name,
                        audio.duration_ms / 1000.0,
                        1000 * (time.perf_counter() - started),
                    )

            streamed = ahead and any(j.first_chunk_frames for j in part)
            results = loaded.runner.synthesize(requests, on_partial if streamed else None, share)
            if len(results) != len(part):
                raise RuntimeError(f"runner returned {len(results)} results for {len(part)} requests")
            return [_plain(job, result, delivered.get(job, 0)) for job, result in zip(part, results, strict=True)]

        def on_error(size: int, exc: BaseException) -> None:
            log.error("model %s: a batch of %d segments failed", self.name, size, exc_info=exc)

        started = time.perf_counter()
        # Out of memory: the batch is split in halves and retried before anything fails (pipeline/oom.py).
        halving = run_in_halves(jobs, run, on_error=on_error)
        outcomes: list[SegmentOutcome] = []
        for part in halving.parts:
            for i, job in enumerate(part.items):
                if part.results is None:
                    outcomes.append(SegmentFailed(job.session_id, job.seq, "synthesis failed"))
                    ahead_ms = delivered.get(job, 0) * 1000.0 / SOURCE_SAMPLE_RATE_HZ  # its opening was sent
                    scheduler.complete(job, ahead_ms, time.monotonic(), sent_at.get(job))
                else:
                    audio = part.results[i]
                    outcomes.append(audio)
                    scheduler.complete(job, audio.total_ms, time.monotonic(), sent_at.get(job))
        compute_s = time.perf_counter() - started
        if not halving.failed:  # a step that raised says nothing about what a step costs
            scheduler.observe_step(jobs, compute_s)
        audio_s = sum(o.total_ms for o in outcomes if isinstance(o, SegmentAudio)) / 1000.0
        tokens = sum(j.tokens for j in jobs)
        report = BatchReport(
            self.name, len(jobs), tokens, compute_s, audio_s, halving.failed, halving.splits, protected
        )
        log.debug(
            "model %s: %d segments, %d tokens, %.0f ms for %.2f s of audio",
            self.name,
            len(jobs),
            tokens,
            1000 * compute_s,
            audio_s,
        )
        self._post(outcomes, report)

    def _post(self, outcomes: list[SegmentOutcome], report: BatchReport | None) -> None:
        """Hand outcomes to the event loop (from the engine thread)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._dispatch, outcomes, report)
        except RuntimeError:  # the loop is closed: the server is going away
            self._inbox.stop()


def _fail_calls(commands: Sequence[_Command], reason: str) -> None:
    for command in commands:
        if isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
            command.future.set_exception(EngineStoppedError(reason))


def _plain(job: SegmentJob, result: SynthesisResultLike, sent: int = 0) -> SegmentAudio:
    """Copy the result into plain numpy arrays the event loop can own, without the samples before `sent`
    (delivered ahead already)."""
    audio = np.ascontiguousarray(result.audio, dtype=np.float32).reshape(-1)
    durations = np.ascontiguousarray(result.durations, dtype=np.int64).reshape(-1)
    if len(durations) != len(job.phonemes) + 2:
        raise RuntimeError(f"runner returned {len(durations)} durations for {len(job.phonemes)} phonemes")
    offset = result.offset
    total = offset + len(audio) if result.total_samples is None else result.total_samples
    if offset > sent:
        raise RuntimeError(f"runner skipped samples {sent}..{offset} of segment {job.seq}")
    return SegmentAudio(job.session_id, job.seq, audio[sent - offset :], durations, max(sent, offset), total)
