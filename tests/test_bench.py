"""`rt-server bench` end to end: it spawns our server and the baseline with the tiny model, runs two sessions
against each, and reports sane figures. No timing assertions: only that every field is there and consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rt_server.bench_cli import BASELINE_SETTINGS, spawn_plan
from rt_server.cli import build_parser, main

pytestmark = pytest.mark.timeout(300)


def test_spawn_plan_gives_the_baseline_its_settings() -> None:
    args = build_parser().parse_args(
        ["bench", "--spawn", "--model", "tiny", "--set", "short_first_segment=on", "--variant", "idle:idle_cut_ms=100"]
    )
    plan = dict(spawn_plan(args))
    assert list(plan) == ["ours", "baseline", "idle"]
    assert plan["ours"][:2] == ["--model", "tiny"]
    assert "--short-first-segment" in plan["ours"]
    # the baseline's own settings come last, so they win over the common ones
    baseline = ["--max-batch-size", "1", "--no-short-first-segment", "--no-trim-pauses", "--first-chunk-ms", "0"]
    assert plan["baseline"][-6:] == baseline
    assert BASELINE_SETTINGS == {
        "max_batch_size": "1",
        "short_first_segment": "off",
        "trim_pauses": "off",
        "first_chunk_ms": "0",
    }
    assert plan["idle"][-2:] == ["--idle-cut-ms", "100"]
    # a level above the per-client session limit raises it (every simulated client shares one address)
    many = build_parser().parse_args(["bench", "--spawn", "--sessions", "1", "100"])
    ours = dict(spawn_plan(many))["ours"]
    assert ours[ours.index("--max-sessions") + 1] == "100"


def test_bench_against_spawned_tiny_servers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    status = main(
        [
            "--log-level",
            "warning",
            "bench",
            "--spawn",
            "--model",
            "tiny",
            "--sessions",
            "2",
            "--turns",
            "1",
            "--rounds",
            "1",
            "--sentences",
            "1",
            "--turn-gap-s",
            "0",
            "--json",
            str(out),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "ours/base" in printed
    assert "sustained with zero underruns (ours)" in printed
    report = json.loads(out.read_text())
    levels = {level["target"]: level for level in report["levels"]}
    assert set(levels) == {"ours", "baseline"}
    for level in levels.values():
        assert level["num_sessions"] == 2
        assert level["turns"] == 2
        assert level["errors"] == 0
        assert level["ttfa_ms"]["count"] == 2  # every turn had audio and a trigger
        assert 0 < level["ttfa_ms"]["p50"] <= level["ttfa_ms"]["p95"] <= level["ttfa_ms"]["p99"]
        assert level["text_to_audio_ms"]["p50"] >= level["ttfa_ms"]["min"]
        # speech plays after the first frame arrives (not asserted: the tiny model's audio may be quiet)
        assert level["speech_heard_ms"]["count"] <= level["ttfa_ms"]["count"]
        assert level["audio_s"] > 0 and level["aggregate_rtf"] > 0
        assert level["underruns"] >= 0 and level["underrun_s"] >= 0
        assert level["batch_mean"] >= 1
        assert sum(level["batch_counts"].values()) >= 2
        assert level["server_cpu_cores"] > 0
        assert level["server_rss_max_mib"] > 0
        assert level["model_rtf"] > 0
    assert levels["baseline"]["batch_mean"] == 1  # batching off
    # the baseline cuts whole sentences: its first segments are longer than ours
    assert levels["baseline"]["first_segment_phonemes"] > levels["ours"]["first_segment_phonemes"]
    assert set(report["ratios"]["2"]) >= {"ttfa_p50", "ttfa_p95", "aggregate_rtf", "server_cpu_cores"}
    assert set(report["sustained_sessions"]) == {"ours", "baseline"}
    assert report["machine"]["cpus"] >= 1
    assert {r["target"] for r in report["runs"]} == {"ours", "baseline"}
    for run in report["runs"]:
        for session in run["sessions"]:
            assert session["close_code"] == 1000
            assert [t["trigger"] for t in session["turns"]] == ["text"]
