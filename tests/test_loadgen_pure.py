"""The load generator's pure parts: statistics, the playout clock (underruns), the first-segment trigger, the
scripts, reading /metrics, and the report's pooling and ratios."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rt_server.loadgen import prometheus
from rt_server.loadgen.client import SessionResult, TurnResult
from rt_server.loadgen.playback import PlayoutClock
from rt_server.loadgen.prometheus import BatchSizes
from rt_server.loadgen.report import (
    BASELINE,
    OURS,
    figures,
    ratios,
    summarize_runs,
    sustained_sessions,
    table,
    to_json,
)
from rt_server.loadgen.run import RunResult
from rt_server.loadgen.script import SENTENCES, passage, turn_script, word_messages
from rt_server.loadgen.stats import percentile, ratio, summarize
from rt_server.loadgen.trigger import Sent, SentMessage, TriggerKind, find_trigger, segment_end
from rt_server.metrics import Gauges, Metrics

# -- statistics ------------------------------------------------------------------------------------------------


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_edges() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], 101)


def test_summary_and_ratio() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s.count, s.min, s.max, s.mean, s.p50) == (4, 1.0, 4.0, 2.5, 2.5)
    assert summarize([]).p50 is None
    assert ratio(1.0, 4.0) == 0.25
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None


# -- the playout clock -------------------------------------------------------------------------------------------


def test_frames_ahead_of_playback_never_underrun() -> None:
    clock = PlayoutClock()
    for i in range(50):
        clock.on_frame(10.0 + i * 0.015, 0.020)  # arriving faster than they play
    assert clock.underruns == 0
    assert clock.underrun_s == 0.0
    assert clock.audio_s == pytest.approx(1.0)
    assert clock.playout_end == pytest.approx(11.0)
    assert clock.buffered_s(10.5) == pytest.approx(0.5)


def test_a_late_frame_is_one_underrun_lasting_until_it_arrives() -> None:
    clock = PlayoutClock()
    assert clock.on_frame(0.0, 0.5) == 0.0  # plays until 0.5
    assert clock.on_frame(0.1, 0.5) == 0.5  # queued: plays until 1.0
    assert clock.on_frame(1.3, 0.2) == 1.3  # 0.3 s of silence before it
    assert clock.on_frame(1.4, 0.2) == pytest.approx(1.5)  # queued behind it (plays 1.5 .. 1.7)
    assert clock.underruns == 1
    assert clock.underrun_s == pytest.approx(0.3)
    assert clock.playout_end == pytest.approx(1.7)


def test_gaps_within_the_tolerance_and_between_turns_are_not_underruns() -> None:
    clock = PlayoutClock(tolerance_s=0.05)
    clock.on_frame(0.0, 0.1)
    clock.on_frame(0.14, 0.1)  # 40 ms late: tolerated
    assert clock.underruns == 0
    clock.end_turn()
    clock.on_frame(5.0, 0.1)  # a new turn after silence
    assert clock.underruns == 0
    assert clock.first_frame_at == 5.0
    with pytest.raises(ValueError, match="shorter"):
        clock.on_frame(6.0, -1.0)


@given(st.lists(st.tuples(st.floats(0, 0.5), st.floats(0.001, 0.2)), min_size=1, max_size=40))
def test_playout_spans_exactly_the_audio_plus_the_underruns(steps: list[tuple[float, float]]) -> None:
    clock = PlayoutClock()
    now = 0.0
    for wait_s, duration_s in steps:
        now += wait_s
        clock.on_frame(now, duration_s)
    assert clock.first_frame_at is not None and clock.playout_end is not None
    span = clock.playout_end - clock.first_frame_at
    assert span == pytest.approx(clock.audio_s + clock.underrun_s, abs=1e-9)


# -- the trigger of time to first audio ----------------------------------------------------------------------


def _sent(*items: tuple[str, float]) -> list[SentMessage]:
    """("text", t) for phonemes; ("<flush>", t) for a flush."""
    return [
        SentMessage(Sent.FLUSH, "", t) if text == "<flush>" else SentMessage(Sent.PHONEMES, text, t)
        for text, t in items
    ]


def test_segment_end_in_the_raw_text() -> None:
    assert segment_end("ab  cd ef ", "ab cd") == 6
    assert segment_end("ab cd", "ab cd") == 5
    assert segment_end("ab cd", "ab cx") is None
    assert segment_end("ab", "ab cd") is None
    assert segment_end("ab", "") is None


def test_trigger_is_the_message_that_carried_the_next_character() -> None:
    # a word and its trailing space in one message: that message lets the server cut
    words = _sent(("ab ", 1.0), ("cd ", 2.0), ("ef ", 3.0), ("<flush>", 4.0))
    trigger = find_trigger(words, "ab cd", first_audio_at=2.5)
    assert trigger is not None
    assert (trigger.index, trigger.kind, trigger.sent_at) == (1, TriggerKind.TEXT, 2.0)
    # words with a leading space: the word's end is known only when the next message arrives
    leading = _sent(("ab", 1.0), (" cd", 2.0), (" ef", 3.0), ("<flush>", 4.0))
    trigger = find_trigger(leading, "ab cd", first_audio_at=3.5)
    assert trigger is not None
    assert (trigger.index, trigger.kind) == (2, TriggerKind.TEXT)


def test_trigger_forced_by_a_flush_and_by_the_idle_timeout() -> None:
    whole = _sent(("ab cd.", 1.0), ("<flush>", 1.1))
    trigger = find_trigger(whole, "ab cd.", first_audio_at=1.5)
    assert trigger is not None
    assert (trigger.index, trigger.kind) == (1, TriggerKind.FORCED)
    # the first frame came before the flush was sent: the server cut on its idle timer after the last phoneme
    idle = _sent(("ab ", 1.0), ("cd", 2.0), ("<flush>", 9.0))
    trigger = find_trigger(idle, "ab cd", first_audio_at=3.0)
    assert trigger is not None
    assert (trigger.index, trigger.kind, trigger.sent_at) == (1, TriggerKind.IDLE, 2.0)
    assert find_trigger(idle, "xy", first_audio_at=3.0) is None


# -- scripts ------------------------------------------------------------------------------------------------------


def test_scripts_keep_the_words() -> None:
    text = passage(len(SENTENCES) - 1, 2)  # wraps around the corpus
    assert text == f"{SENTENCES[-1]} {SENTENCES[0]}"
    assert "".join(word_messages(text)).split() == text.split()
    words = turn_script(text, words_per_s=10)
    assert words.interval_s == pytest.approx(0.1)
    assert all(m.endswith(" ") and len(m.split()) == 1 for m in words.messages)
    assert turn_script(text, words_per_s=None).messages == (text,)
    with pytest.raises(ValueError, match="positive"):
        turn_script(text, words_per_s=0)
    with pytest.raises(ValueError, match="sentence"):
        passage(0, 0)


# -- /metrics ---------------------------------------------------------------------------------------------------

_GAUGES = Gauges(0, False, 0.0, 0.0, 1, {"m": 0}, {"m": 0}, {"m": True}, {"m": 3})


def test_batch_sizes_between_two_scrapes_of_the_real_renderer() -> None:
    metrics = Metrics()
    metrics.on_batch("m", 1, 0.1, 1.0, failed=False)
    before = prometheus.parse(metrics.render(_GAUGES))
    for size in (1, 3, 3, 8):
        metrics.on_batch("m", size, 0.2, 2.0, failed=False)
    metrics.on_batch("other", 2, 0.5, 1.0, failed=False)
    metrics.on_batch("m", 4, 0.3, 1.5, failed=True)  # one segment of 4 failed: the others' audio still counts
    metrics.on_protected("m", 2)
    metrics.on_protected("m", 0)
    after = prometheus.parse(metrics.render(_GAUGES))
    sizes = prometheus.batch_sizes(before, after)
    assert sizes.steps == 6
    assert sizes.mean == pytest.approx(21 / 6)
    assert sizes.counts == {"1": 1, "2": 1, "4": 3, "8": 1, "16": 0, "32": 0, "+Inf": 0}
    assert prometheus.delta(before, after, "rt_compute_seconds_total") == pytest.approx(1.6)
    assert prometheus.delta(before, after, "rt_audio_seconds_total") == pytest.approx(10.5)
    assert after[("rt_batch_failures_total", (("model", "m"),))] == 1
    assert after[("rt_protected_segments_total", (("model", "m"),))] == 2
    assert after[("rt_primes_total", (("model", "m"),))] == 3
    assert prometheus.parse('# comment\nbad line\nx{a="1"} nan-ish\ny 2\n') == {("y", ()): 2.0}


# -- the report ---------------------------------------------------------------------------------------------------


def _turn(ttfa_s: float | None, underruns: int = 0, audio_s: float = 3.0) -> TurnResult:
    speech_s = None if ttfa_s is None else ttfa_s + 0.4
    return TurnResult(ttfa_s, "text", ttfa_s, speech_s, 8, audio_s, underruns, 0.1 * underruns)


def _run(target: str, n: int, ttfa_s: float, underruns: int = 0, errors: tuple[str, ...] = ()) -> RunResult:
    sessions = tuple(
        SessionResult((_turn(ttfa_s, underruns if i == 0 else 0), _turn(ttfa_s * 2)), errors, 1000) for i in range(n)
    )
    return RunResult(
        target=target,
        num_sessions=n,
        round=0,
        turns_per_session=2,
        wall_s=10.0,
        sessions=sessions,
        server_cpu_s=5.0,
        server_rss_max_bytes=300 * 2**20,
        batch=BatchSizes(steps=4, mean=float(n), counts={"1": 4}),
        model_compute_s=2.0,
        model_audio_s=6.0 * n,
        load_average=(2.0, 2.5),
    )


def test_levels_pool_runs_and_compare_with_the_baseline() -> None:
    runs = [
        _run(OURS, 1, 0.1),
        _run(BASELINE, 1, 0.4),
        _run(OURS, 1, 0.1),
        _run(BASELINE, 1, 0.4),
        _run(OURS, 2, 0.2, underruns=1),
        _run(BASELINE, 2, 0.8, errors=("stalled",)),
    ]
    levels = summarize_runs(runs)
    assert [(lv.target, lv.num_sessions, lv.runs) for lv in levels] == [
        (OURS, 1, 2),
        (BASELINE, 1, 2),
        (OURS, 2, 1),
        (BASELINE, 2, 1),
    ]
    ours1, base1 = levels[0], levels[1]
    assert ours1.turns == 4
    assert ours1.ttfa_ms.count == 4
    assert ours1.ttfa_ms.p50 == pytest.approx(150.0)
    assert ours1.speech_heard_ms.p50 == pytest.approx(550.0)
    assert ours1.aggregate_rtf == pytest.approx(12.0 / 20.0)
    assert ours1.server_cpu_cores == pytest.approx(0.5)
    assert ours1.server_rss_max_mib == pytest.approx(300.0)
    assert ours1.model_rtf == pytest.approx(4.0 / 12.0)
    assert ratios(ours1, base1)["ttfa_p50"] == pytest.approx(0.25)
    assert ratios(ours1, base1)["underruns"] is None  # 0 / 0
    assert figures(levels[2])["underruns"] == 1.0
    assert sustained_sessions(levels, OURS) == 1  # N=2 had an underrun
    assert sustained_sessions(levels, BASELINE) == 1  # N=2 had an error
    text = table(levels)
    assert text.count("ours/base") == 2
    assert "0.25×" in text
    report = to_json(runs, levels, {"sessions": [1, 2]}, {"cpus": 2})
    assert report["sustained_sessions"] == {OURS: 1, BASELINE: 1}
    assert math.isclose(report["ratios"]["1"]["ttfa_p50"], 0.25)
    assert len(report["runs"]) == 6


def test_a_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from rt_server.loadgen.report import plot

    levels = summarize_runs([_run(OURS, 1, 0.1), _run(BASELINE, 1, 0.4), _run(OURS, 2, 0.2), _run(BASELINE, 2, 0.9)])
    path = tmp_path / "bench.png"
    plot(levels, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_load_generator_needs_neither_torch_nor_the_server_stack() -> None:
    """A client machine runs `rt-server bench --url` without the model or the web framework."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'starlette', 'uvicorn'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pkgutil, importlib, rt_server.loadgen as lg\n"
        "for m in pkgutil.iter_modules(lg.__path__): importlib.import_module('rt_server.loadgen.' + m.name)\n"
        "import rt_server.bench_cli\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
