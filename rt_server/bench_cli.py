"""`rt-server bench`: N concurrent real-time sessions against our server and the baseline, side by side.

    rt-server bench --spawn --voices-dir ../shared/voices --voice af_heart --json b.json --plot b.png
    rt-server bench --url ws://host:8000/v1/stream --server-pid 1234    # a server already running (no baseline)

With `--spawn` it starts two servers from the same model arguments: ours (the settings as configured, plus any
`--set`) and the baseline, the way existing Kokoro servers work: batching off (`max_batch_size` 1), no short
first segment (`short_first_segment` off: whole sentences), the model's pauses kept (`trim_pauses` off) and every
segment sent whole (`first_chunk_ms` 0). It runs each level against both, interleaved, and
reports every figure with its ratio, ours / baseline. What the figures mean: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rt_server.cli import add_model_arguments
from rt_server.loadgen.client import ClientOptions
from rt_server.loadgen.report import (
    BASELINE,
    OURS,
    LevelSummary,
    machine,
    plot,
    summarize_runs,
    sustained_sessions,
    table,
    to_json,
)
from rt_server.loadgen.run import LoadOptions, Target, sweep
from rt_server.loadgen.server_proc import SpawnedServer

# Settings of the baseline server (on top of everything ours gets): one segment per model step, whole sentences,
# sent whole.
BASELINE_SETTINGS = {
    "max_batch_size": "1",
    "short_first_segment": "off",
    "trim_pauses": "off",
    "first_chunk_ms": "0",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="load generator: concurrent real-time sessions, time to first audio, underruns, vs a baseline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server's stream URL, ws://HOST:PORT/v1/stream")
    where.add_argument("--spawn", action="store_true", help="start our server and the baseline on loopback ports")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: its process id, for CPU and memory")
    p.add_argument("--baseline-url", default=None, help="with --url: a running baseline server to compare with")
    p.add_argument("--baseline-pid", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true", help="with --spawn: start only our server")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --spawn: a server setting for both servers (e.g. first_segment_min_phonemes=8), repeatable",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V,K=V",
        help="with --spawn: one more server, ours with these settings, run interleaved like the others",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --spawn: an environment variable for every server (e.g. OMP_NUM_THREADS=1), repeatable",
    )
    p.add_argument("--model", dest="models", action="append", metavar="SPEC", help="with --spawn: as for serve")
    add_model_arguments(p)
    load = p.add_argument_group("load")
    load.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8], help="levels N (default 1 2 4 8)")
    load.add_argument("--turns", type=int, default=3, help="turns per session, one after another (default 3)")
    load.add_argument("--rounds", type=int, default=2, help="runs per level and server, order alternated")
    load.add_argument("--sentences", type=int, default=2, help="sentences per turn (default 2)")
    load.add_argument("--words-per-s", type=float, default=15.0, help="input rate, one word per message")
    load.add_argument("--whole", action="store_true", help="send each turn's text in one message instead")
    load.add_argument("--ramp-s", type=float, default=1.0, help="session i starts at i × RAMP / N (default 1)")
    load.add_argument("--voice", default=None, help="voice for every session (default: the server's first)")
    load.add_argument("--stream-model", default=None, help="model name sessions ask for (default: the server's)")
    load.add_argument("--frame-ms", type=int, default=20)
    load.add_argument("--lead-ms", type=int, default=500, help="pace realtime lead (default 500)")
    load.add_argument("--turn-gap-s", type=float, default=0.5, help="silence between turns (default 0.5)")
    load.add_argument("--underrun-tolerance-ms", type=float, default=0.0, help="shorter gaps are not counted")
    load.add_argument("--startup-timeout-s", type=float, default=600.0)
    out = p.add_argument_group("output")
    out.add_argument("--json", dest="json_path", default=None, help="write everything measured as JSON")
    out.add_argument("--plot", dest="plot_path", default=None, help="write a PNG: latency and throughput vs N")
    p.set_defaults(handler=_bench)


def _settings_args(items: Sequence[str]) -> list[str]:
    """NAME=VALUE items as `serve` flags."""
    args: list[str] = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"setting {item!r}: use NAME=VALUE")
        args += ["--" + name.strip().replace("_", "-"), value.strip()]
    return args


def _bool_flags(args: list[str]) -> list[str]:
    """`--x on|off` as serve's boolean flags `--x` / `--no-x` for the boolean settings."""
    from rt_server.settings import setting_names, setting_type

    booleans = {"--" + n.replace("_", "-") for n in setting_names() if setting_type(n) == "bool"}
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in booleans and i + 1 < len(args):
            on = args[i + 1].lower() in ("1", "true", "yes", "on")
            out.append(args[i] if on else "--no-" + args[i][2:])
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def _model_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for spec in args.models or []:
        out += ["--model", spec]
    for flag, value in (
        ("--weights", args.weights),
        ("--config", args.config),
        ("--voices-dir", args.voices_dir),
        ("--device", args.device),
        ("--precision", args.precision),
    ):
        if value is not None:
            out += [flag, value]
    if getattr(args, "compile", None) is not None:
        out.append("--compile" if args.compile else "--no-compile")
    return out


def _room_for(num_sessions: int) -> list[str]:
    """Session limits that admit `num_sessions` from this one client address (only where the defaults do not)."""
    from rt_server.settings import Settings

    defaults = Settings()
    out: list[str] = []
    for name in ("max_sessions", "max_sessions_per_client"):
        if hasattr(defaults, name) and getattr(defaults, name) < num_sessions:
            out += ["--" + name.replace("_", "-"), str(num_sessions)]
    return out


def spawn_plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, serve arguments) of every server to start: ours, the baseline, the variants."""
    common = _model_args(args) + _room_for(max(args.sessions)) + _settings_args(args.settings)
    plan = [(OURS, _bool_flags(common))]
    if not args.no_baseline:
        baseline = [f"{k}={v}" for k, v in BASELINE_SETTINGS.items()]
        plan.append((BASELINE, _bool_flags(common + _settings_args(baseline))))
    for variant in args.variant:
        name, sep, items = variant.partition(":")
        if not sep or not name or name in (OURS, BASELINE):
            raise ValueError(f"variant {variant!r}: use NAME:K=V,K=V with a new name")
        plan.append((name, _bool_flags(common + _settings_args(items.split(",")))))
    return plan


def _options(args: argparse.Namespace) -> LoadOptions:
    return LoadOptions(
        turns=args.turns,
        sentences=args.sentences,
        words_per_s=None if args.whole else args.words_per_s,
        ramp_s=args.ramp_s,
        client=ClientOptions(
            voice=args.voice,
            model=args.stream_model,
            frame_ms=args.frame_ms,
            lead_ms=args.lead_ms,
            turn_gap_s=args.turn_gap_s,
            underrun_tolerance_s=args.underrun_tolerance_ms / 1000.0,
        ),
    )


def _config(args: argparse.Namespace, plan: list[tuple[str, list[str]]]) -> dict[str, Any]:
    keys = ("sessions", "turns", "rounds", "sentences", "words_per_s", "whole", "ramp_s", "voice", "frame_ms")
    config: dict[str, Any] = {k: getattr(args, k) for k in keys}
    config |= {"lead_ms": args.lead_ms, "turn_gap_s": args.turn_gap_s, "pace": "realtime"}
    config["servers"] = dict(plan) if plan else {"ours": args.url}
    config["server_env"] = list(args.server_env)
    return config


def run_bench(args: argparse.Namespace) -> tuple[list[LevelSummary], dict[str, Any]]:
    """Start what is needed, run the sweep, print the table; returns the summaries and the JSON report."""
    options = _options(args)
    plan = spawn_plan(args) if args.spawn else []
    host = machine()
    env = dict(os.environ)
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--server-env {item!r}: use NAME=VALUE")
        env[name] = value
    with ExitStack() as stack:
        if args.spawn:
            targets = []
            for name, server_args in plan:
                print(f"[bench] starting {name}: rt-server serve {' '.join(server_args)}", file=sys.stderr, flush=True)
                server = stack.enter_context(SpawnedServer(name, server_args, env=env))
                server.start(args.startup_timeout_s)
                targets.append(Target(name, server.url, server.pid))
        else:
            targets = [Target(OURS, args.url, args.server_pid)]
            if args.baseline_url:
                targets.append(Target(BASELINE, args.baseline_url, args.baseline_pid))
        results = asyncio.run(sweep(targets, args.sessions, options, rounds=args.rounds))
    levels = summarize_runs(results)
    report = to_json(results, levels, _config(args, plan), host)
    print(f"machine: {host.get('cpu')}, {host.get('cpus')} CPUs; load average at start {host['load_average'][0]:.1f}")
    mode = "whole turns" if options.words_per_s is None else f"word by word at {options.words_per_s:g} words/s"
    print(
        f"load: {options.turns} turns × {options.sentences} sentences per session, {mode}, pace realtime "
        f"(lead {options.client.lead_ms} ms), {args.rounds} runs per level and server, interleaved"
    )
    print(table(levels))
    for target in dict.fromkeys(lv.target for lv in levels):
        print(f"sustained with zero underruns ({target}): {sustained_sessions(levels, target)} sessions")
    return levels, report


def _bench(args: argparse.Namespace) -> int:
    if not args.spawn and (args.no_baseline or args.settings or args.variant or args.server_env):
        print("error: --no-baseline, --set, --variant and --server-env go with --spawn", file=sys.stderr)
        return 2
    try:
        levels, report = run_bench(args)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    if args.plot_path:
        try:
            title = f"{report['machine'].get('cpu')}, {report['machine'].get('cpus')} CPUs"
            plot(levels, args.plot_path, title=title)
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    return 0
