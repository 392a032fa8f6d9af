"""What a bench run reports: per level and server, the figures and their ratios (ours / baseline), as a table,
JSON and a plot. Pure except `machine()` (reads /proc) and `plot()` (writes a PNG with matplotlib).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rt_server.loadgen.run import RunResult
from rt_server.loadgen.stats import Summary, ratio, summarize

OURS = "ours"
BASELINE = "baseline"


@dataclass(frozen=True)
class LevelSummary:
    """Every run of one server at one level (N sessions), pooled."""

    target: str
    num_sessions: int
    runs: int
    turns: int  # turns played, over all sessions and runs
    ttfa_ms: Summary  # trigger -> first frame (rt_server.loadgen.trigger), one sample per turn
    text_to_audio_ms: Summary  # a turn's first message -> first frame
    speech_heard_ms: Summary  # trigger -> the first sample of speech plays
    first_segment_phonemes: float | None  # mean length of the turns' first segments
    underruns: int
    underrun_s: float
    turns_with_underruns: int
    errors: int  # error events and client failures
    audio_s: float
    wall_s: float
    aggregate_rtf: float  # audio seconds delivered per wall second, over all sessions
    model_rtf: float | None  # the server's compute seconds per audio second (from /metrics)
    batch_mean: float | None
    batch_counts: dict[str, int] = field(default_factory=dict)  # model steps per rt_batch_size bucket
    server_cpu_cores: float | None = None  # server CPU seconds per wall second
    server_rss_max_mib: float | None = None

    @property
    def clean(self) -> bool:
        """Zero underruns, zero errors, and audio in every turn."""
        return self.underruns == 0 and self.errors == 0 and self.ttfa_ms.count == self.turns


def summarize_level(runs: Sequence[RunResult]) -> LevelSummary:
    if not runs or len({(r.target, r.num_sessions) for r in runs}) != 1:
        raise ValueError("runs of exactly one server and level")
    turns = [t for r in runs for s in r.sessions for t in s.turns]
    expected_turns = sum(r.num_sessions * r.turns_per_session for r in runs)
    wall_s = sum(r.wall_s for r in runs)
    audio_s = sum(t.audio_s for t in turns)
    compute = [r.model_compute_s for r in runs if r.model_compute_s is not None]
    model_audio = [r.model_audio_s for r in runs if r.model_audio_s is not None]
    batches = [r.batch for r in runs if r.batch is not None]
    steps = sum(b.steps for b in batches)
    counts: dict[str, int] = {}
    for b in batches:
        for bound, n in b.counts.items():
            counts[bound] = counts.get(bound, 0) + n
    cpu = [r.server_cpu_s for r in runs if r.server_cpu_s is not None]
    rss = [r.server_rss_max_bytes for r in runs if r.server_rss_max_bytes is not None]
    first_lengths = [t.first_segment_phonemes for t in turns if t.first_segment_phonemes]
    return LevelSummary(
        target=runs[0].target,
        num_sessions=runs[0].num_sessions,
        runs=len(runs),
        turns=expected_turns,
        ttfa_ms=summarize([t.ttfa_s * 1000 for t in turns if t.ttfa_s is not None]),
        text_to_audio_ms=summarize([t.text_to_audio_s * 1000 for t in turns if t.text_to_audio_s is not None]),
        speech_heard_ms=summarize([t.speech_heard_s * 1000 for t in turns if t.speech_heard_s is not None]),
        first_segment_phonemes=sum(first_lengths) / len(first_lengths) if first_lengths else None,
        underruns=sum(t.underruns for t in turns),
        underrun_s=sum(t.underrun_s for t in turns),
        turns_with_underruns=sum(1 for t in turns if t.underruns),
        errors=sum(len(s.errors) for r in runs for s in r.sessions),
        audio_s=audio_s,
        wall_s=wall_s,
        aggregate_rtf=audio_s / wall_s if wall_s > 0 else 0.0,
        model_rtf=sum(compute) / sum(model_audio) if compute and sum(model_audio) > 0 else None,
        batch_mean=sum((b.mean or 0.0) * b.steps for b in batches) / steps if steps else None,
        batch_counts=counts,
        server_cpu_cores=sum(cpu) / wall_s if len(cpu) == len(runs) and wall_s > 0 else None,
        server_rss_max_mib=max(rss) / 2**20 if rss else None,
    )


def summarize_runs(results: Sequence[RunResult]) -> list[LevelSummary]:
    """One summary per (server, level), levels ascending, servers in the order they first ran."""
    keys: list[tuple[str, int]] = []
    for r in results:
        if (r.target, r.num_sessions) not in keys:
            keys.append((r.target, r.num_sessions))
    keys.sort(key=lambda k: k[1])
    return [summarize_level([r for r in results if (r.target, r.num_sessions) == key]) for key in keys]


def sustained_sessions(levels: Sequence[LevelSummary], target: str) -> int:
    """The largest N such that this server's runs at N and at every smaller level measured were clean (0 if
    none)."""
    best = 0
    for level in sorted((lv for lv in levels if lv.target == target), key=lambda lv: lv.num_sessions):
        if not level.clean:
            break
        best = level.num_sessions
    return best


# -- the figures of a level, their ratios, the table ----------------------------------------------------------

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("TTFA p50", "ttfa_p50"),
    ("TTFA p95", "ttfa_p95"),
    ("TTFA p99", "ttfa_p99"),
    ("speech p50", "speech_heard_p50"),
    ("text→audio p50", "text_to_audio_p50"),
    ("underruns", "underruns"),
    ("underrun s", "underrun_s"),
    ("agg RTF", "aggregate_rtf"),
    ("model RTF", "model_rtf"),
    ("batch", "batch_mean"),
    ("CPU cores", "server_cpu_cores"),
    ("RSS MiB", "server_rss_max_mib"),
    ("errors", "errors"),
)


def figures(level: LevelSummary) -> dict[str, float | None]:
    """The figures the table shows (milliseconds for latencies), by key."""
    return {
        "ttfa_p50": level.ttfa_ms.p50,
        "ttfa_p95": level.ttfa_ms.p95,
        "ttfa_p99": level.ttfa_ms.p99,
        "speech_heard_p50": level.speech_heard_ms.p50,
        "text_to_audio_p50": level.text_to_audio_ms.p50,
        "underruns": float(level.underruns),
        "underrun_s": level.underrun_s,
        "aggregate_rtf": level.aggregate_rtf,
        "model_rtf": level.model_rtf,
        "batch_mean": level.batch_mean,
        "server_cpu_cores": level.server_cpu_cores,
        "server_rss_max_mib": level.server_rss_max_mib,
        "errors": float(level.errors),
    }


def ratios(ours: LevelSummary, baseline: LevelSummary) -> dict[str, float | None]:
    """ours / baseline for every figure (None where undefined, e.g. zero underruns in the baseline)."""
    a, b = figures(ours), figures(baseline)
    return {key: ratio(a[key], b[key]) for key in a}


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    if key in ("underruns", "errors"):
        return f"{value:.0f}"
    if key.startswith(("ttfa", "text_to", "speech")):
        return f"{value:.0f} ms"
    if key == "server_rss_max_mib":
        return f"{value:.0f}"
    return f"{value:.2f}"


def table(levels: Sequence[LevelSummary]) -> str:
    """A Markdown table: per level, a row per server and a row of ratios (ours / baseline)."""
    header = ["N", "server", *(name for name, _ in _COLUMNS)]
    rows: list[list[str]] = []
    for n in sorted({lv.num_sessions for lv in levels}):
        at_n = {lv.target: lv for lv in levels if lv.num_sessions == n}
        for level in at_n.values():
            values = figures(level)
            rows.append([str(n), level.target, *(_cell(key, values[key]) for _, key in _COLUMNS)])
        if OURS in at_n and BASELINE in at_n:
            r = ratios(at_n[OURS], at_n[BASELINE])
            rows.append(["", "ours/base", *("—" if r[key] is None else f"{r[key]:.2f}×" for _, key in _COLUMNS)])
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


# -- JSON and the plot ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Where the numbers came from: CPU model, cores, memory, load, Python."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), None
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return info


def to_json(
    results: Sequence[RunResult], levels: Sequence[LevelSummary], config: dict[str, Any], host: dict[str, Any]
) -> dict[str, Any]:
    by_level: dict[int, dict[str, LevelSummary]] = {}
    for level in levels:
        by_level.setdefault(level.num_sessions, {})[level.target] = level
    return {
        "machine": host,
        "config": config,
        "levels": [asdict(level) | {"clean": level.clean} for level in levels],
        "ratios": {
            str(n): ratios(at_n[OURS], at_n[BASELINE])
            for n, at_n in sorted(by_level.items())
            if OURS in at_n and BASELINE in at_n
        },
        "sustained_sessions": {t: sustained_sessions(levels, t) for t in dict.fromkeys(lv.target for lv in levels)},
        "runs": [asdict(r) for r in results],
    }


def plot(levels: Sequence[LevelSummary], path: str | Path, title: str = "") -> None:
    """Latency (TTFA p50 and p95) and throughput (aggregate RTF) against N, a line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, (latency, throughput, underrun) = plt.subplots(1, 3, figsize=(11, 3.4), dpi=80)
    sizes = sorted({lv.num_sessions for lv in levels})
    for target in dict.fromkeys(lv.target for lv in levels):
        mine = sorted((lv for lv in levels if lv.target == target), key=lambda lv: lv.num_sessions)
        n = [lv.num_sessions for lv in mine]
        (line,) = latency.plot(n, [lv.ttfa_ms.p50 for lv in mine], marker="o", label=f"{target} p50")
        p95 = [lv.ttfa_ms.p95 for lv in mine]
        latency.plot(n, p95, marker="v", ls="--", color=line.get_color(), label=f"{target} p95")
        throughput.plot(n, [lv.aggregate_rtf for lv in mine], marker="o", color=line.get_color(), label=target)
        underrun.plot(n, [lv.underrun_s for lv in mine], marker="o", color=line.get_color(), label=target)
    for ax, ylabel in (
        (latency, "time to first audio (ms)"),
        (throughput, "audio s per wall s (all sessions)"),
        (underrun, "underrun total (s)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])  # the levels measured, not powers of two between them
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrent sessions N")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    latency.set_yscale("log")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
