"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library. No I/O.

Counters and histograms are updated on the event loop only (engine reports arrive there as plain data);
gauges are read at scrape time from the registry and the engines.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from rt_server.protocol import ErrorCode

_LATENCY_BUCKETS_S: Final = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32)
_RTF_BUCKETS: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        cumulative = 0
        sep = "," if labels else ""
        for bound, n in zip(self.buckets, self.counts, strict=False):
            cumulative += n
            yield f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        suffix = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{suffix} {self.total}"
        yield f"{name}_count{suffix} {self.count}"


@dataclass(frozen=True)
class Gauges:
    """Values read at scrape time."""

    sessions_active: int
    sessions_draining: bool
    buffer_ms_total: float
    buffer_ms_max: float
    event_loop_tasks: int
    queue_depth: dict[str, int]  # per model
    engine_sessions: dict[str, int]
    models_ready: dict[str, bool]
    primes: dict[str, int]  # per model, since it started (`ModelEngine.prime`)
    resident_memory_bytes: int | None = None


class Metrics:
    def __init__(self) -> None:
        self.sessions_total = 0
        self.errors: Counter[str] = Counter()
        self.ttfa = Histogram(_LATENCY_BUCKETS_S)
        self.batch_size: dict[str, Histogram] = {}
        self.rtf: dict[str, Histogram] = {}
        self.audio_seconds: defaultdict[str, float] = defaultdict(float)
        self.compute_seconds: defaultdict[str, float] = defaultdict(float)
        self.batch_failures: Counter[str] = Counter()
        self.oom_splits: Counter[str] = Counter()
        self.protected: Counter[str] = Counter()

    # SessionObserver
    def on_session_admitted(self) -> None:
        self.sessions_total += 1

    def on_error(self, code: ErrorCode) -> None:
        self.errors[code.value] += 1

    def on_first_audio(self, seconds: float) -> None:
        self.ttfa.observe(seconds)

    def on_batch(self, model: str, size: int, compute_s: float, audio_s: float, failed: bool) -> None:
        self.batch_size.setdefault(model, Histogram(_BATCH_BUCKETS)).observe(size)
        self.compute_seconds[model] += compute_s
        self.audio_seconds[model] += audio_s  # what its segments that succeeded delivered
        if failed:
            self.batch_failures[model] += 1  # its time includes the failed attempts: no real-time factor
        elif audio_s > 0:
            self.rtf.setdefault(model, Histogram(_RTF_BUCKETS)).observe(compute_s / audio_s)

    def on_oom_splits(self, model: str, splits: int) -> None:
        if splits:
            self.oom_splits[model] += splits

    def on_protected(self, model: str, segments: int) -> None:
        if segments:
            self.protected[model] += segments

    def render(self, gauges: Gauges) -> str:
        out: list[str] = []

        def header(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        header("rt_sessions_active", "gauge", "Open WebSocket sessions.")
        out.append(f"rt_sessions_active {gauges.sessions_active}")
        header("rt_draining", "gauge", "1 while the server is shutting down.")
        out.append(f"rt_draining {int(gauges.sessions_draining)}")
        header("rt_sessions_total", "counter", "Sessions accepted.")
        out.append(f"rt_sessions_total {self.sessions_total}")
        header("rt_errors_total", "counter", "Error events sent, by code.")
        for code, n in sorted(self.errors.items()):
            out.append(f'rt_errors_total{{code="{code}"}} {n}')
        header("rt_time_to_first_audio_seconds", "histogram", "First phonemes of a turn to its first frame.")
        out.extend(self.ttfa.lines("rt_time_to_first_audio_seconds"))
        header("rt_session_buffer_ms", "gauge", "Framed audio waiting for the socket, over all sessions.")
        out.append(f"rt_session_buffer_ms {gauges.buffer_ms_total}")
        header("rt_session_buffer_max_ms", "gauge", "The largest per-session framed audio buffer.")
        out.append(f"rt_session_buffer_max_ms {gauges.buffer_ms_max}")
        header("rt_event_loop_tasks", "gauge", "Live asyncio tasks on the server's event loop.")
        out.append(f"rt_event_loop_tasks {gauges.event_loop_tasks}")
        header("rt_model_ready", "gauge", "1 when the model is loaded and warmed up.")
        for model, ready in sorted(gauges.models_ready.items()):
            out.append(f'rt_model_ready{{model="{model}"}} {int(ready)}')
        header("rt_queue_depth", "gauge", "Segments queued for synthesis.")
        for model, depth in sorted(gauges.queue_depth.items()):
            out.append(f'rt_queue_depth{{model="{model}"}} {depth}')
        header("rt_engine_sessions", "gauge", "Sessions the engine's scheduler knows.")
        for model, n in sorted(gauges.engine_sessions.items()):
            out.append(f'rt_engine_sessions{{model="{model}"}} {n}')
        header("rt_batch_size", "histogram", "Segments per model step.")
        for model, hist in sorted(self.batch_size.items()):
            out.extend(hist.lines("rt_batch_size", f'model="{model}"'))
        header("rt_real_time_factor", "histogram", "Compute time over audio time, per batch.")
        for model, hist in sorted(self.rtf.items()):
            out.extend(hist.lines("rt_real_time_factor", f'model="{model}"'))
        header("rt_audio_seconds_total", "counter", "Audio synthesised.")
        for model, seconds in sorted(self.audio_seconds.items()):
            out.append(f'rt_audio_seconds_total{{model="{model}"}} {seconds}')
        header("rt_compute_seconds_total", "counter", "Time spent in model steps.")
        for model, seconds in sorted(self.compute_seconds.items()):
            out.append(f'rt_compute_seconds_total{{model="{model}"}} {seconds}')
        header("rt_batch_failures_total", "counter", "Model steps in which some segment failed.")
        for model, n in sorted(self.batch_failures.items()):
            out.append(f'rt_batch_failures_total{{model="{model}"}} {n}')
        header("rt_oom_splits_total", "counter", "Batch halvings after running out of memory.")
        for model, n in sorted(self.oom_splits.items()):
            out.append(f'rt_oom_splits_total{{model="{model}"}} {n}')
        header(
            "rt_protected_segments_total",
            "counter",
            "Segments run ahead of a new turn's first segment so that a playing listener would not run dry.",
        )
        for model, n in sorted(self.protected.items()):
            out.append(f'rt_protected_segments_total{{model="{model}"}} {n}')
        header("rt_primes_total", "counter", "Fronts run to warm an idle model as a turn began, cut short or not.")
        for model, n in sorted(gauges.primes.items()):
            out.append(f'rt_primes_total{{model="{model}"}} {n}')
        if gauges.resident_memory_bytes is not None:
            header("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
            out.append(f"process_resident_memory_bytes {gauges.resident_memory_bytes}")
        return "\n".join(out) + "\n"
