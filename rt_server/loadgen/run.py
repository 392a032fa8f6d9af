"""Running the load: one level (N concurrent sessions against one server) and the sweep that interleaves the
servers under test (ours and the baseline) level by level, so both see the same machine at nearly the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rt_server.loadgen import prometheus
from rt_server.loadgen.client import ClientOptions, SessionResult, run_session
from rt_server.loadgen.prometheus import BatchSizes
from rt_server.loadgen.script import TurnScript, passage, turn_script
from rt_server.loadgen.server_proc import ProcSampler, fetch, http_base


@dataclass(frozen=True)
class Target:
    """A server under test: its stream URL and, when known (spawned, or given), its process id on this host."""

    name: str
    url: str
    pid: int | None = None


@dataclass(frozen=True)
class LoadOptions:
    turns: int = 3  # per session, one after another
    sentences: int = 2  # per turn
    words_per_s: float | None = 15.0  # None: each turn's text in one message
    ramp_s: float = 1.0  # session i starts at i * ramp_s / N
    client: ClientOptions = field(default_factory=ClientOptions)

    def scripts(self, session_index: int) -> list[TurnScript]:
        """Session i's turns: passages of the corpus, a different start for each session and turn."""
        return [
            turn_script(passage(session_index + turn, self.sentences), words_per_s=self.words_per_s)
            for turn in range(self.turns)
        ]


@dataclass(frozen=True)
class RunResult:
    """One level against one server."""

    target: str
    num_sessions: int
    round: int
    turns_per_session: int
    wall_s: float
    sessions: tuple[SessionResult, ...]
    server_cpu_s: float | None
    server_rss_max_bytes: int | None
    batch: BatchSizes | None
    model_compute_s: float | None  # time in model steps during the run, from /metrics
    model_audio_s: float | None
    load_average: tuple[float, float]  # this host's 1-minute load average before and after


async def _scrape(url: str) -> dict[prometheus.Key, float] | None:
    try:
        status, body = await asyncio.to_thread(fetch, http_base(url) + "/metrics")
    except OSError:
        return None
    return prometheus.parse(body) if status == 200 else None


async def run_level(target: Target, num_sessions: int, options: LoadOptions, round_index: int = 0) -> RunResult:
    """N sessions against `target`, started `ramp_s / N` apart; returns once every one has finished."""
    before = await _scrape(target.url)
    sampler = ProcSampler(target.pid)
    load_before = os.getloadavg()[0]
    sampler.start()
    started = time.perf_counter()

    async def session(index: int) -> SessionResult:
        await asyncio.sleep(index * options.ramp_s / num_sessions)
        return await run_session(target.url, options.scripts(index), options.client)

    async with asyncio.TaskGroup() as tasks:
        sampling = tasks.create_task(sampler.run())
        running = [tasks.create_task(session(i)) for i in range(num_sessions)]
        try:
            await asyncio.gather(*running)
        finally:
            sampling.cancel()
    wall_s = time.perf_counter() - started
    cpu_s = sampler.cpu_used_s()
    after = await _scrape(target.url)
    batch: BatchSizes | None = None
    compute_s: float | None = None
    audio_s: float | None = None
    if before is not None and after is not None:
        batch = prometheus.batch_sizes(before, after)
        compute_s = prometheus.delta(before, after, "rt_compute_seconds_total")
        audio_s = prometheus.delta(before, after, "rt_audio_seconds_total")
    return RunResult(
        target=target.name,
        num_sessions=num_sessions,
        round=round_index,
        turns_per_session=options.turns,
        wall_s=wall_s,
        sessions=tuple(task.result() for task in running),
        server_cpu_s=cpu_s,
        server_rss_max_bytes=sampler.rss_max_bytes,
        batch=batch,
        model_compute_s=compute_s,
        model_audio_s=audio_s,
        load_average=(load_before, os.getloadavg()[0]),
    )


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def sweep(
    targets: Sequence[Target],
    session_counts: Sequence[int],
    options: LoadOptions,
    *,
    rounds: int = 2,
    progress: Callable[[str], None] = _progress,
) -> list[RunResult]:
    """Every level, `rounds` times, the targets interleaved and their order alternated (ABBA), so drifts in the
    machine's load fall on both alike."""
    results: list[RunResult] = []
    for num_sessions in session_counts:
        for round_index in range(rounds):
            order = list(targets) if round_index % 2 == 0 else list(reversed(targets))
            for target in order:
                result = await run_level(target, num_sessions, options, round_index)
                results.append(result)
                with contextlib.suppress(Exception):
                    progress(_progress_line(result))
    return results


def _progress_line(result: RunResult) -> str:
    ttfa = [t.ttfa_s for s in result.sessions for t in s.turns if t.ttfa_s is not None]
    underruns = sum(t.underruns for s in result.sessions for t in s.turns)
    errors = sum(len(s.errors) for s in result.sessions)
    median = sorted(ttfa)[len(ttfa) // 2] * 1000 if ttfa else float("nan")
    return (
        f"[bench] {result.target:<8} N={result.num_sessions:<3} round {result.round}: {result.wall_s:6.1f} s, "
        f"TTFA median {median:6.0f} ms, {underruns} underruns, {errors} errors"
    )
