"""Soak: many sessions connecting, streaming, clearing, flushing and disconnecting abruptly, for minutes.

    python bench/soak.py [--duration-s 180] [--connections 16] [--real] [--seed 1]
    python bench/soak.py --url ws://127.0.0.1:8000/v1/stream [--api-key KEY]

Loopback only: it starts its own server (`rt-server serve`, the tiny model by default, `--real` for the
imported Kokoro weights) on 127.0.0.1, or targets `--url`, which must be a loopback address. Bounded: at most
`--connections` sessions at once (at most 256) for `--duration-s` (at most an hour).

Reports sessions served, audio delivered, errors by code, close codes, the server's resident memory (sampled
every 10 s: from /proc for its own server, from /debug/state otherwise), and whether every accepted flush was
answered: a flush sent in a session that was neither cleared after it nor dropped by this client must get its
`flushed` before the session ends. The leak check compares the server after warm-up with the server at the
end, both idle, after a garbage collection and after the C allocator handed its free pages back
(`/debug/state?gc=1`): Python objects, event-loop tasks and trimmed resident memory. Exits 1 when a flush was
lost, a session saw 1011, the server kept sessions, work or tasks after the clients were gone, or trimmed memory
grew by more than `--max-rss-growth-mib`. Needs the target's `debug_endpoints` on (its own server has them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import websockets
from websockets.exceptions import ConnectionClosed

SENTENCES = [
    "həlˈoʊ wˈɜːld.",
    "ðɪs ɪz ə tˈɛst ʌv ðə sˈɪstəm.",
    "wˈʌn tˈuː θɹˈiː, fˈɔːɹ fˈaɪv sˈɪks.",
    "ðə kwˈɪk bɹˈaʊn fˈɑːks ʤˈʌmps ˌoʊvəɹ ðə lˈeɪzi dˈɔɡ.",
    "sˈɛvən ˈeɪt nˈaɪn tˈɛn.",
]
SCENARIOS = {  # name: weight
    "stream": 4,
    "clear": 2,
    "realtime": 1,
    "abort_in_synthesis": 1,
    "abort_in_sending": 1,
    "abort_in_flush": 1,
}
SAMPLE_RATE_HZ = 24_000
MAX_CONNECTIONS = 256
MAX_DURATION_S = 3600.0
SESSION_TIMEOUT_S = 120.0  # one session, start to end; beyond it the server is stuck, which the soak reports


@dataclass
class Tally:
    sessions_started: int = 0
    sessions_completed: int = 0  # `done` and 1000
    sessions_aborted: int = 0  # dropped by this client on purpose
    audio_bytes: int = 0
    flushes_expected: int = 0
    flushes_answered: int = 0
    flushes_lost: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[int] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # unexpected outcomes, first few kept

    def fail(self, message: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(message)


class Session:
    """One raw WebSocket session that keeps count of what it was promised."""

    def __init__(self, ws: Any, tally: Tally) -> None:
        self.ws = ws
        self.tally = tally
        self.pending_flushes: list[str] = []  # sent, not yet answered, not cancelled
        self.flush_seq = 0

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj))

    async def flush(self) -> str:
        self.flush_seq += 1
        flush_id = f"f{self.flush_seq}"
        await self.send({"type": "flush", "id": flush_id})
        self.pending_flushes.append(flush_id)
        self.tally.flushes_expected += 1
        return flush_id

    async def read_until(self, event_type: str | None, *, frames: int | None = None) -> dict[str, Any] | None:
        """Read until an event of `event_type` (returned), `frames` audio frames, or the close (None)."""
        seen = 0
        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosed:
                self.tally.close_codes[self.ws.close_code or 1006] += 1
                if self.ws.close_code == 1011:
                    self.tally.fail("a session was closed with 1011")
                return None
            if isinstance(message, bytes):
                self.tally.audio_bytes += len(message)
                seen += 1
                if frames is not None and seen >= frames:
                    return None
                continue
            event = json.loads(message)
            if event["type"] == "flushed":
                if event["id"] in self.pending_flushes:
                    self.pending_flushes.remove(event["id"])
                    self.tally.flushes_answered += 1
                else:
                    self.tally.fail(f"a flushed nobody asked for: {event}")
            elif event["type"] == "cleared":
                self.tally.flushes_expected -= len(self.pending_flushes)  # cancelled, as documented
                self.pending_flushes.clear()
            elif event["type"] == "error":
                self.tally.errors[event["code"]] += 1
            if event["type"] == event_type:
                return dict(event)

    def drop(self) -> None:
        """This client goes away on purpose: its unanswered flushes were not owed."""
        self.tally.flushes_expected -= len(self.pending_flushes)
        self.pending_flushes.clear()
        self.tally.sessions_aborted += 1
        self.ws.transport.abort()

    def end(self) -> None:
        if self.pending_flushes:
            self.tally.flushes_lost += len(self.pending_flushes)
            self.tally.fail(f"flushes never answered: {self.pending_flushes}")


def _text(rng: random.Random, sentences: int) -> list[str]:
    """`sentences` sentences, split into a few pieces at random (as a language model would stream them)."""
    text = " ".join(rng.choice(SENTENCES) for _ in range(sentences)) + " "
    cuts = sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


async def _scenario(url: str, headers: dict[str, str], rng: random.Random, tally: Tally) -> None:
    name = rng.choices(list(SCENARIOS), weights=list(SCENARIOS.values()))[0]
    tally.scenarios[name] += 1
    ws = await websockets.connect(url, compression=None, additional_headers=headers, open_timeout=30)
    session = Session(ws, tally)
    try:
        start: dict[str, Any] = {"type": "start"}
        if name == "realtime":
            start |= {"pace": "realtime", "lead_ms": 200}
        await session.send(start)
        ready = json.loads(await ws.recv())
        if ready["type"] != "ready":
            tally.errors[ready.get("code", "?")] += 1
            await session.read_until(None)
            return
        tally.sessions_started += 1
        for piece in _text(rng, rng.randint(1, 3)):
            await session.send({"type": "phonemes", "text": piece})
        if name == "abort_in_synthesis":
            await session.flush()
            session.drop()
            return
        if name == "abort_in_flush":
            await session.flush()
            await session.read_until("flushed", frames=rng.randint(1, 20))
            session.drop()
            return
        if name == "abort_in_sending":
            await session.read_until(None, frames=rng.randint(1, 40))
            session.drop()
            return
        await session.flush()
        if name == "clear":
            await session.read_until("flushed", frames=rng.randint(1, 10))
            await session.send({"type": "clear"})
            await session.read_until("cleared")
            await session.send({"type": "phonemes", "text": rng.choice(SENTENCES)})
            await session.flush()
        while session.pending_flushes:
            if await session.read_until("flushed") is None:
                break
        if session.ws.close_code is None:
            await session.send({"type": "close"})
            done = await session.read_until("done")
            if done is not None:
                await session.read_until(None)
                if ws.close_code == 1000:
                    tally.sessions_completed += 1
        session.end()
    finally:
        ws.transport.abort()


async def _worker(url: str, headers: dict[str, str], rng: random.Random, tally: Tally, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(SESSION_TIMEOUT_S):
                await _scenario(url, headers, rng, tally)
        except TimeoutError:
            tally.fail(f"a session took over {SESSION_TIMEOUT_S} s")
        except (OSError, websockets.InvalidHandshake) as exc:
            tally.fail(f"connection failed: {exc!r}")
            await asyncio.sleep(1.0)


# -- the server ------------------------------------------------------------------------------------------


def _loopback_url(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or urlsplit(url).scheme not in ("ws", "wss"):
        raise SystemExit(f"error: {url!r} is not a ws:// URL on a loopback address; the soak runs on loopback only")
    return url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(base: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    request = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def _rss_bytes(pid: int | None, base: str, headers: dict[str, str]) -> int | None:
    if pid is not None:
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    status_code, body = _get(base, "/debug/state", headers)
    return json.loads(body).get("rss_bytes") if status_code == 200 else None


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    model = [] if args.real else ["--model", "tiny"]
    limit = str(args.connections + 8)
    command = [
        sys.executable,
        "-m",
        "rt_server",
        "serve",
        *model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--debug-endpoints",
        "--max-sessions",
        limit,
        "--max-sessions-per-client",
        limit,
    ]
    log = open(args.server_log, "wb") if args.server_log else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while _get(base, "/readyz", {})[0] != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("error: the server did not become ready")
        time.sleep(0.5)
    return process, f"ws://127.0.0.1:{port}/v1/stream"


async def _settle(base: str, headers: dict[str, str], timeout_s: float = 60.0) -> dict[str, Any] | None:
    """The server's state once no session and no work is left (None if that never happens)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = await asyncio.to_thread(_get, base, "/debug/state?gc=1", headers)
        if status != 200:
            return None
        state: dict[str, Any] = json.loads(body)
        engines = state["engines"].values()
        if not state["sessions"] and all(e["queue_depth"] == 0 and e["sessions"] == 0 for e in engines):
            return state
        await asyncio.sleep(0.5)
    return {"stuck": True}


async def _run(args: argparse.Namespace, url: str, pid: int | None) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = url.replace("ws://", "http://", 1).replace("wss://", "https://", 1).rsplit("/v1/stream", 1)[0]
    rng = random.Random(args.seed)
    tally = Tally()
    # Warm-up: a minute's worth of sessions first, so the start figure includes the allocator's working set.
    warm_deadline = time.monotonic() + args.warmup_s
    async with asyncio.TaskGroup() as tasks:
        for i in range(args.connections):
            tasks.create_task(_worker(url, headers, random.Random(rng.random() + i), Tally(), warm_deadline))
    baseline = await _settle(base, headers)
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    deadline = started + args.duration_s

    async def sample() -> None:
        while time.monotonic() < deadline:
            rss = await asyncio.to_thread(_rss_bytes, pid, base, headers)
            if rss is not None:
                samples.append((time.monotonic() - started, rss))
            await asyncio.sleep(10.0)

    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(sample())
        for i in range(args.connections):
            tasks.create_task(_worker(url, headers, random.Random(rng.random() + i), tally, deadline))
    elapsed_s = time.monotonic() - started
    rss_end = _rss_bytes(pid, base, headers)
    final = await _settle(base, headers)
    return _report(args, tally, elapsed_s, rss_end, samples, baseline, final)


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _report(
    args: argparse.Namespace,
    tally: Tally,
    elapsed_s: float,
    rss_end: int | None,
    samples: list[tuple[float, int]],
    baseline: dict[str, Any] | None,
    final: dict[str, Any] | None,
) -> int:
    audio_s = tally.audio_bytes / 2 / SAMPLE_RATE_HZ
    baseline, final = baseline or {}, final or {}
    trimmed_start, trimmed_end = baseline.get("rss_trimmed_bytes"), final.get("rss_trimmed_bytes")
    growth = None if trimmed_start is None or trimmed_end is None else trimmed_end - trimmed_start
    peak = max((rss for _, rss in samples), default=None)
    flushes = f"{tally.flushes_expected} / {tally.flushes_answered} / {tally.flushes_lost}"
    series = " ".join(f"{rss / 2**20:.0f}" for _, rss in samples[:: max(1, len(samples) // 12)])
    rows = [
        ("model", "real (imported weights)" if args.real else "tiny (random weights)"),
        ("duration", f"{elapsed_s:.0f} s after {args.warmup_s:.0f} s of warm-up, {args.connections} connections"),
        ("sessions started", str(tally.sessions_started)),
        ("  completed (done, 1000)", str(tally.sessions_completed)),
        ("  dropped abruptly by the client", str(tally.sessions_aborted)),
        ("scenarios", ", ".join(f"{k} {v}" for k, v in sorted(tally.scenarios.items()))),
        ("audio delivered", f"{audio_s:.0f} s ({audio_s / max(elapsed_s, 1e-9):.1f} s per second)"),
        ("flushes owed / answered / lost", flushes),
        ("errors by code", ", ".join(f"{k} {v}" for k, v in sorted(tally.errors.items())) or "none"),
        ("close codes", ", ".join(f"{k} {v}" for k, v in sorted(tally.close_codes.items()))),
        ("server RSS, 10 s samples (MiB)", series or "n/a"),
        ("  peak / at the end", f"{_mib(peak)} / {_mib(rss_end)}"),
        ("  trimmed, after warm-up / end", f"{_mib(trimmed_start)} / {_mib(trimmed_end)}"),
        ("  trimmed growth", "n/a" if growth is None else f"{growth / 2**20:+.1f} MiB"),
        ("event-loop tasks before / after", f"{baseline.get('tasks')} / {final.get('tasks')}"),
        ("Python objects before / after", f"{baseline.get('gc_objects')} / {final.get('gc_objects')}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    problems = list(tally.failures)
    if tally.flushes_lost or tally.flushes_answered != tally.flushes_expected:
        problems.append("not every accepted flush was answered")
    if not final or final.get("stuck"):
        problems.append(f"the server did not return to idle: {final}")
    if growth is not None and growth > args.max_rss_growth_mib * 2**20:
        problems.append(f"trimmed memory grew by more than {args.max_rss_growth_mib} MiB")
    if baseline.get("tasks") != final.get("tasks"):
        problems.append("event-loop tasks were left behind")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--real", action="store_true", help="serve the imported Kokoro weights, not the tiny model")
    parser.add_argument("--url", default=None, help="a running server on loopback (ws://127.0.0.1:PORT/v1/stream)")
    parser.add_argument("--api-key", default=os.environ.get("RT_SERVER_SOAK_API_KEY"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-rss-growth-mib", type=float, default=32.0)
    parser.add_argument("--server-log", default=None, help="write the server's own output here")
    args = parser.parse_args()
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        parser.error(f"--connections must be within 1..{MAX_CONNECTIONS}")
    if not 0 < args.duration_s <= MAX_DURATION_S or not 0 <= args.warmup_s <= MAX_DURATION_S:
        parser.error(f"--duration-s and --warmup-s must be within 0..{MAX_DURATION_S:.0f}")
    if args.url is not None:
        return asyncio.run(_run(args, _loopback_url(args.url), None))
    process, url = _start_server(args)
    try:
        return asyncio.run(_run(args, url, process.pid))
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        if process.poll() is None:
            process.kill()


if __name__ == "__main__":
    sys.exit(main())
