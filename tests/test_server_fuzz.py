"""Hostile input against a real server: thousands of random and mutated frames over real WebSockets.

A seeded generator (RT_FUZZ_SEED, RT_FUZZ_MESSAGES to change the run) sends bad JSON, wrong types, huge numbers,
unicode edge cases (lone surrogates, astral symbols, controls, odd whitespace), binary frames, fragmented
frames, invalid UTF-8, out-of-order and oversize messages, and mutations of valid ones. Every frame gets the
answer docs/protocol.md documents for it (tests/fuzz_oracle.py says which), never 1011; meanwhile a
well-behaved session keeps getting exactly its audio, /readyz stays 200, and afterwards nothing is left behind.

Many frames share a connection: after a batch of frames the client sends a flush of its own and reads up to its
`flushed`, so every answer before it belongs to the batch; a fatal frame ends the connection, and the next one
starts afresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
from fuzz_oracle import ConnectionState, Expect, Limits, classify
from server_harness import RunningServer, make_settings, receive_until_closed, start_server

from rt_server.model.config import tiny_config_dict

# 53-125 s alone on a quiet 2-core machine, 180-210 s with three runs side by side: CI's machine is shared, so
# the whole run has room (a batch whose answers stop coming fails after IDLE_TIMEOUT_S with the server's state).
pytestmark = pytest.mark.timeout(540)

SEED = int(os.environ.get("RT_FUZZ_SEED", "8"))
MESSAGES = int(os.environ.get("RT_FUZZ_MESSAGES", "3000"))
MAX_MESSAGE_BYTES = 8192
MAX_PENDING = 600
# Nothing at all from the server for this long fails a batch. Not a bound on the batch itself: a session at
# speed 0.5 with `pace: realtime` may have a minute of audio to play before our flush is answered.
IDLE_TIMEOUT_S = 60
VOCAB = frozenset(tiny_config_dict()["vocab"])
LETTERS = sorted(c for c in VOCAB if c.isalpha() or c in "ˈˌː")
ODD_SPACE = [" ", "\t", "\n", "\u00a0", "\u2028", "\u3000", "\x1f", "\u2003"]
# Symbols outside the vocabulary: digits, astral, controls, bidi overrides, BOM, noncharacters, lone surrogates.
_CANDIDATES = "19🙂\U0010ffff\x00\x7f\u202e\ufeff\u200d\uffff中\ud800\udfffé<&\\%$\u0301ß"
BAD_SYMBOLS = [c for c in _CANDIDATES if c not in VOCAB and not c.isspace()]
GOOD_VOICES = frozenset({"af_test", "am_test", "af_test:0.7,am_test:0.3", "am_test:1"})
BAD_VOICES = frozenset({"nobody", "../evil", "/etc/passwd", "af_test:0", "af_test,", "af_test:abc", "zz" * 100})
LIMITS = Limits(MAX_MESSAGE_BYTES, MAX_PENDING, VOCAB, GOOD_VOICES, BAD_VOICES, frozenset({"tiny"}))
HELLO = "həlˈoʊ wˈɜːld."


@dataclass
class Frame:
    payload: str | bytes
    binary: bool = False
    fragments: int = 1  # sent as this many frames of one message

    def __post_init__(self) -> None:
        if isinstance(self.payload, str):
            try:
                self.payload.encode("utf-8")
            except UnicodeEncodeError:  # a raw lone surrogate: on the wire, a text frame that is not UTF-8
                self.payload = self.payload.encode("utf-8", "surrogatepass")


def _dumps(obj: Any, rng: random.Random) -> str:
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)  # lone surrogates only survive as \\u escapes


class Generator:
    """Frames for each situation, from one seeded random source."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def word(self, low: int = 1, high: int = 6) -> str:
        return "".join(self.rng.choice(LETTERS) for _ in range(self.rng.randint(low, high)))

    def valid_text(self) -> str:
        words = [self.word() for _ in range(self.rng.randint(1, 3))]
        text = self.rng.choice(ODD_SPACE).join(words)
        return text + self.rng.choice([" ", ". ", ", ", "! ", "… "])

    def json_value(self) -> Any:
        return self.rng.choice(
            [
                None,
                True,
                False,
                0,
                -1,
                2**53,
                -(2**63),
                10**300,
                1.5,
                -0.0,
                1e308,
                float("nan"),
                float("inf"),
                "",
                "x" * 300,
                "\ud800",
                "🙂",
                [],
                [1, [2, [3]]],
                {},
                {"a": {"b": None}},
            ]
        )

    def flush_id(self, *, valid: bool) -> Any:
        if valid:
            return self.rng.choice(
                [None, "", "a", "ə" * 128, "\ud800\udfff", "🙂", "\x00", 0, -7, 2**53 - 1, -(2**53 - 1), "sync"]
            )
        return self.rng.choice([1.5, 1.0, 2**53, -(2**53), 10**400, True, False, [1], {"id": 1}, "x" * 129])

    def start_obj(self, *, valid: bool) -> dict[str, Any]:
        good: dict[str, Any] = {
            "voice": self.rng.choice([*GOOD_VOICES, None]),
            "speed": self.rng.choice([0.5, 1, 1.25, 2.0]),
            "encoding": self.rng.choice(["pcm_s16le", "pcm_f32le", "mulaw"]),
            "sample_rate": self.rng.choice([8000, 16000, 24000, 48000, 24000.0]),
            "frame_ms": self.rng.choice([10, 20, 200, 40.0]),
            "pace": self.rng.choice(["none", "realtime"]),
            "lead_ms": self.rng.choice([0, 500, 10_000]),
            "alignment": False,
            "model": self.rng.choice(["tiny", None]),
        }
        obj = {k: v for k, v in good.items() if v is not None and self.rng.random() < 0.7}
        if not valid:
            key = self.rng.choice(
                ["speed", "encoding", "sample_rate", "frame_ms", "pace", "lead_ms", "alignment", "voice", "model"]
            )
            bad = {
                "speed": [0.49, 2.01, "1", None, float("nan"), 1e308, True],
                "encoding": ["PCM", "", 1, None],
                "sample_rate": [44100, 0, -24000, 24000.5, "24000", 10**30],
                "frame_ms": [9, 201, 20.5, "20", -20],
                "pace": ["fast", None, 1],
                "lead_ms": [-1, 10_001, 0.5, "500"],
                "alignment": [1, "true", None],
                "voice": ["", 5, ["af_test"], "v" * 257],
                "model": ["", 0, {"name": "tiny"}, "m" * 257],
            }[key]
            obj[key] = self.rng.choice(bad)
        elif self.rng.random() < 0.1:
            obj["voice"] = self.rng.choice(sorted(BAD_VOICES))
        elif self.rng.random() < 0.05:
            obj["model"] = self.rng.choice(["../../etc/passwd", "TINY", "tiny2", "kokoro"])
        if self.rng.random() < 0.2:
            obj[self.rng.choice(["extra", "🙂", "x" * 60, "Voice"])] = self.json_value()
        return {"type": "start", **obj}

    def mutate(self, text: str) -> str:
        chars = list(text)
        for _ in range(self.rng.randint(1, 3)):
            op = self.rng.randrange(5)
            i = self.rng.randrange(len(chars) + 1)
            pool = '{}[]",:\\ 0123456789eE.-+tfn' + "".join(BAD_SYMBOLS) + "".join(LETTERS[:8])
            if op == 0 and chars:
                del chars[min(i, len(chars) - 1)]
            elif op == 1:
                chars.insert(i, self.rng.choice(pool))
            elif op == 2 and chars:
                chars[min(i, len(chars) - 1)] = self.rng.choice(pool)
            elif op == 3:
                chars = chars[:i]
            else:
                j = self.rng.randrange(len(chars) + 1)
                chars[i:i] = chars[min(i, j) : max(i, j)][:50]
        return "".join(chars)

    def mutate_value(self) -> str:
        """A valid message with one field's value replaced: still JSON, often the wrong type or range."""
        obj = json.loads(self.template())
        fields = sorted(k for k in obj if k != "type")
        key = self.rng.choice(fields) if fields and self.rng.random() < 0.9 else "type"
        obj[key] = self.json_value() if self.rng.random() < 0.7 else self.rng.choice(["phonemes", "flush", "clear"])
        return _dumps(obj, self.rng)

    def template(self) -> str:
        obj = self.rng.choice(
            [
                {"type": "phonemes", "text": self.valid_text()},
                {"type": "flush", "id": "abc"},
                {"type": "flush"},
                {"type": "clear"},
                self.start_obj(valid=True),
            ]
        )
        return json.dumps(obj, ensure_ascii=False)

    # -- frames for a started session, by kind -----------------------------------------------------------

    def streaming(self) -> Frame:
        r, rng = self.rng.random(), self.rng
        if r < 0.03:
            return Frame(_dumps({"type": "phonemes", "text": self.valid_text()}, rng))
        if r < 0.07:
            text = rng.choice(["", " ", "\u3000\u2028\t", "\n\n"])
            return Frame(_dumps({"type": "phonemes", "text": text, "extra": self.json_value()}, rng))
        if r < 0.22:
            text = list(self.valid_text())
            for _ in range(rng.randint(1, 3)):
                text.insert(rng.randrange(len(text) + 1), rng.choice(BAD_SYMBOLS))
            return Frame(_dumps({"type": "phonemes", "text": "".join(text)}, rng))
        if r < 0.32:
            obj = {"type": "phonemes", "text": self.json_value()}
            if obj["text"] is None and rng.random() < 0.5:
                del obj["text"]
            elif isinstance(obj["text"], str):
                obj["text"] = 42
            return Frame(_dumps(obj, rng))
        if r < 0.36:
            return Frame(_dumps({"type": "phonemes", "text": self.word(511, 700) + " " + self.word()}, rng))
        if r < 0.40:
            words = []
            while sum(len(w) + 1 for w in words) <= MAX_PENDING:
                words.append(self.word(10, 20))
            return Frame(_dumps({"type": "phonemes", "text": " ".join(words)}, rng))
        if r < 0.48:
            flush: dict[str, Any] = {"type": "flush", "id": self.flush_id(valid=True)}
            if flush["id"] is None and rng.random() < 0.5:
                del flush["id"]
            return Frame(_dumps(flush, rng))
        if r < 0.56:
            return Frame(_dumps({"type": "flush", "id": self.flush_id(valid=False)}, rng))
        if r < 0.64:
            return Frame(_dumps(self.start_obj(valid=rng.random() < 0.9), rng))
        if r < 0.70:  # one message in several frames
            obj = {"type": "flush", "id": rng.choice(["frag", 5])}
            return Frame(_dumps(obj, rng), fragments=rng.randint(2, 4))
        if r < 0.97:  # mostly still JSON, but not always
            return Frame(self.mutate(self.template()) if rng.random() < 0.3 else self.mutate_value())
        return self.fatal()

    def fatal(self) -> Frame:
        rng = self.rng
        kind = rng.randrange(11)
        if kind == 0:  # not JSON
            return Frame(rng.choice(["{", "{]", "", " ", "nul", "{'type': 'flush'}", '{"type":"flush",}', "\x00"]))
        if kind == 1:  # JSON, not an object
            return Frame(rng.choice(["[]", "1", "null", '"flush"', "true", "[{}]", "NaN", "-Infinity"]))
        if kind == 2:  # an object without a known type
            typeless = [{}, {"type": "speak"}, {"type": 5}, {"type": None}, {"type": "FLUSH"}]
            return Frame(_dumps(rng.choice(typeless), rng))
        if kind == 3:
            return Frame(rng.randbytes(rng.randint(0, 200)), binary=True)
        if kind == 4:  # over max_message_bytes, within the WebSocket layer's 4x
            size = rng.randint(MAX_MESSAGE_BYTES + 1, 4 * MAX_MESSAGE_BYTES - 40)
            return Frame(_dumps({"type": "phonemes", "text": "a" * size}, rng))
        if kind == 5:  # over 4x max_message_bytes: the WebSocket layer refuses it
            return Frame(rng.choice(["x", "{"]) * (4 * MAX_MESSAGE_BYTES + rng.randint(1, 1000)))
        if kind == 6:  # an integer too long to parse (Python's 4300-digit limit)
            return Frame('{"type":"flush","id":' + "9" * rng.randint(4301, 6000) + "}")
        if kind == 7:  # nesting deeper than the parser's recursion limit
            depth = rng.randint(1100, 3500)
            return Frame("[" * depth + "]" * depth)
        if kind == 8:  # a text frame that is not UTF-8 (a raw lone surrogate, a stray continuation byte)
            raw = rng.choice([b"\xed\xa0\x80", b"\x80", b"\xff\xfe", b"\xc3"])
            return Frame(b'{"type":"phonemes","text":"' + raw + b'"}')
        if kind == 9:
            return Frame(rng.randbytes(rng.randint(MAX_MESSAGE_BYTES + 1, 2 * MAX_MESSAGE_BYTES)), binary=True)
        return Frame(_dumps({"type": "start", "speed": float("nan")}, rng))

    def before_start(self) -> Frame:
        r = self.rng.random()
        if r < 0.80:
            return Frame(_dumps(self.start_obj(valid=self.rng.random() < 0.9), self.rng))
        if r < 0.80:  # rejected, and the session still waits for `start`
            return Frame(_dumps({"type": "flush", "id": self.flush_id(valid=False)}, self.rng))
        if r < 0.90:  # out of order
            obj = self.rng.choice(
                [{"type": "phonemes", "text": HELLO}, {"type": "flush"}, {"type": "clear"}, {"type": "close"}]
            )
            return Frame(_dumps(obj, self.rng))
        if r < 0.95:
            return Frame(self.mutate(self.template()))
        return self.fatal()


@dataclass
class Tally:
    frames: int = 0
    connections: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # by documented answer
    close_codes: Counter[int] = field(default_factory=Counter)
    longest_batch_s: float = 0.0  # from our flush to its `flushed`: realtime-paced audio plays out first


async def _send(ws: Any, frame: Frame) -> None:
    if isinstance(frame.payload, bytes) and not frame.binary:
        await ws.send(frame.payload, text=True)  # deliberately not UTF-8
    elif frame.fragments > 1 and isinstance(frame.payload, str):
        step = max(1, len(frame.payload) // frame.fragments)
        await ws.send([frame.payload[i : i + step] for i in range(0, len(frame.payload), step)])
    else:
        await ws.send(frame.payload)


def _label(expect: Expect) -> str:
    if expect.alternatives:
        return " or ".join(sorted(_label(a) for a in expect.alternatives))
    if expect.kind == "ok":
        done = [name for name in ("ready", "cleared", "flushed", "audio") if getattr(expect, name)]
        return "accepted: " + (", ".join(done) or "nothing to do")
    return f"{expect.kind}: {expect.code or expect.close_code}"


def _fits(expected: list[set[str | None]], got: list[str]) -> bool:
    """`got` (answers in order) fits `expected`: one entry per frame, each the answers it may give (None: no
    answer of this kind). Every way of matching counts, not only the greedy one: a flush that a later `clear` may
    have left unanswered and a flush after it with the same id fit `[id]` either way."""
    reachable = {0}  # how many answers the frames so far can have accounted for
    for allowed in expected:
        reachable = {i + 1 for i in reachable if i < len(got) and got[i] in allowed} | (
            reachable if None in allowed else set()
        )
    return len(got) in reachable


def test_fits_tries_every_matching() -> None:
    # seed 9: flush 5, a clear (so it may go unanswered), flush 5 again, flush "\u0000"
    expected: list[set[str | None]] = [{"5", None}, {"5"}, {'"\\u0000"'}]
    assert _fits(expected, ["5", '"\\u0000"'])  # the greedy reading took the first 5 and failed
    assert _fits(expected, ["5", "5", '"\\u0000"'])
    assert not _fits(expected, ['"\\u0000"', "5"])  # out of order
    assert not _fits(expected, ["5"])  # an answer missing
    assert not _fits(expected, ["5", "5", "5", '"\\u0000"'])  # one too many


class FuzzClient:
    def __init__(self, server: RunningServer, rng: random.Random, tally: Tally) -> None:
        self.server = server
        self.gen = Generator(rng)
        self.rng = rng
        self.tally = tally
        self.sync = 0

    async def connection(self) -> None:
        self.tally.connections += 1
        ws = await websockets.connect(self.server.url, compression=None, max_size=None)
        state = ConnectionState()
        try:
            while not state.started:
                if not await self._one_before_start(ws, state):
                    return
            for _ in range(self.rng.randint(1, 8)):
                if not await self._batch(ws, state):
                    return
            await self._end(ws, state)
        finally:
            ws.transport.abort()  # whatever is left of it; the server must not mind

    async def _one_before_start(self, ws: Any, state: ConnectionState) -> bool:
        frame = self.gen.before_start()
        expect = classify(frame.payload, state, LIMITS, binary=frame.binary)
        self.tally.frames += 1
        self.tally.answers[_label(expect)] += 1
        await _send(ws, frame)
        if expect.kind in ("fatal", "bare"):
            await self._closed(ws, [], expect, frame)
            return False
        if expect.kind == "reject":
            event = json.loads(await ws.recv())
            assert (event["type"], event["code"], "close_code" in event) == ("error", expect.code, False), frame
            return True
        event = json.loads(await ws.recv())  # a start: ready, or (a mutated voice name) unknown_voice
        if event["type"] == "error":
            assert any(a.code == event["code"] for a in expect.alternatives), (event, frame)
            fatal = next(a for a in expect.alternatives if a.code == event["code"])
            await self._closed(ws, [event], fatal, frame)
            return False
        assert event["type"] == "ready" and (expect.ready or expect.alternatives), (event, frame)
        if expect.warning:
            warning = json.loads(await ws.recv())
            assert (warning["type"], warning["code"]) == ("warning", "unknown_fields"), frame
        state.started = True
        return True

    async def _batch(self, ws: Any, state: ConnectionState) -> bool:
        """Frames, then a flush of ours; True if the session goes on."""
        frames: list[Frame] = []
        if self.rng.random() < 0.1:
            frames.append(Frame('{"type":"clear"}'))
        frames += [self.gen.streaming() for _ in range(self.rng.randint(1, 20))]
        errors: list[set[str | None]] = []
        flushes: list[set[Any]] = []
        clears = 0
        audio = False
        for frame in frames:
            expect = classify(frame.payload, state, LIMITS, binary=frame.binary)
            self.tally.frames += 1
            self.tally.answers[_label(expect)] += 1
            await _send(ws, frame)
            if expect.kind in ("fatal", "bare", "done"):
                if expect.kind == "done":
                    await self._after_close(ws, state)
                await self._closed(ws, errors, expect, frame)
                return False
            options = expect.alternatives or (expect,)
            errors.append({a.code if a.kind == "reject" else None for a in options})
            if expect.cleared:
                clears += 1
                flushes = [f | {"<none>"} for f in flushes]  # flushes before a clear may go unanswered
            flushes += [{json.dumps(expect.flushed[0])}] if expect.flushed else []
            audio |= any(a.audio for a in options)
            state.after(next((a for a in options if a.kind == "ok"), expect))
        self.sync += 1
        sync_id = f"sync-{self.sync}"
        await ws.send(json.dumps({"type": "flush", "id": sync_id}))
        started = time.monotonic()
        try:
            flushed = {"type": "flushed", "id": sync_id}
            got = await receive_until_closed(ws, lambda e: e == flushed, idle_timeout_s=IDLE_TIMEOUT_S)
        except TimeoutError:  # say where it stuck, rather than let the whole test's timeout say nothing
            state = await asyncio.to_thread(self.server.state)
            stuck = f"nothing for {IDLE_TIMEOUT_S} s before `flushed` {sync_id}; server: {state}; frames: {frames}"
            raise AssertionError(stuck) from None
        self.tally.longest_batch_s = max(self.tally.longest_batch_s, time.monotonic() - started)
        assert got.close_code is None, (got.events, frames)
        codes = [e["code"] for e in got.events if e["type"] == "error"]
        assert all("close_code" not in e for e in got.events if e["type"] == "error"), (got.events, frames)
        assert _fits(errors, codes), (codes, errors, frames)
        answered = [json.dumps(e["id"]) for e in got.events[:-1] if e["type"] == "flushed"]
        assert _fits([f - {"<none>"} | ({None} if "<none>" in f else set()) for f in flushes], answered), (
            answered,
            flushes,
            frames,
        )
        assert [e["type"] for e in got.events].count("cleared") == clears, (got.events, frames)
        assert {e["type"] for e in got.events} <= {"error", "flushed", "cleared"}, got.events
        assert audio or not got.frames, "audio from nothing"
        state.synced()
        return True

    async def _after_close(self, ws: Any, state: ConnectionState) -> None:
        state.closing = True
        for _ in range(self.rng.randint(0, 3)):  # ignored after `close` (not bare: those the layer refuses)
            frame = self.gen.streaming()
            expect = classify(frame.payload, state, LIMITS, binary=frame.binary)
            if expect.kind != "bare":
                self.tally.frames += 1
                self.tally.answers["ignored after close"] += 1
                await _send(ws, frame)

    async def _closed(self, ws: Any, seen: list[Any], expect: Expect, frame: Frame) -> None:
        got = await receive_until_closed(ws)
        assert got.close_code is not None
        self.tally.close_codes[got.close_code] += 1
        assert got.close_code != 1011, (got.events, frame)
        errors = [e for e in got.events if e["type"] == "error"]
        if expect.kind == "fatal":
            last = errors[-1] if errors else (seen[-1] if seen else None)
            assert last is not None and last["code"] == expect.code, (got.events, frame)
            assert last["close_code"] == expect.close_code == got.close_code, (got.events, frame)
            assert got.close_reason == expect.code, (got.close_reason, frame)
        elif expect.kind == "done":
            assert got.events[-1] == {"type": "done"}, (got.events, frame)
            assert got.close_code == 1000, frame
        else:  # refused by the WebSocket layer: a close without an `error` of its own
            assert got.close_code == expect.close_code, (got.close_code, frame)
            assert all("close_code" not in e for e in errors), (got.events, frame)

    async def _end(self, ws: Any, state: ConnectionState) -> None:
        how = self.rng.random()
        if how < 0.4:
            await ws.send('{"type":"close"}')
            await self._closed(ws, [], Expect("done", close_code=1000), Frame("close"))
        elif how < 0.7:
            await ws.close()


async def _well_behaved(server: RunningServer, stop: asyncio.Event) -> list[int]:
    """A normal client, all along: each round its text and a flush, answered with exactly its audio."""
    sizes: list[int] = []
    while not stop.is_set():
        async with asyncio.timeout(60), websockets.connect(server.url, compression=None) as ws:
            await ws.send(json.dumps({"type": "start", "voice": "am_test"}))
            assert json.loads(await ws.recv())["type"] == "ready"
            for round_id in range(3):
                await asyncio.sleep(0.5)  # a person, not a load generator
                await ws.send(json.dumps({"type": "phonemes", "text": HELLO}))
                await ws.send(json.dumps({"type": "flush", "id": round_id}))
                got = await receive_until_closed(ws, stop_after="flushed")
                assert got.events == [{"type": "flushed", "id": round_id}], got.events
                sizes.append(sum(len(f) for f in got.frames))
            await ws.send('{"type":"close"}')
            done = await receive_until_closed(ws)
            assert (done.types(), done.close_code) == (["done"], 1000)
    return sizes


async def _poll_ready(server: RunningServer, stop: asyncio.Event) -> list[int]:
    statuses: list[int] = []
    while not stop.is_set():
        status, _ = await asyncio.to_thread(server.get, "/readyz")
        statuses.append(status)
        await asyncio.sleep(0.25)
    return statuses


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    settings = make_settings(
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_pending_phonemes=MAX_PENDING,
        max_sessions_per_client=64,
        start_timeout_s=30.0,
    )
    running = start_server(settings)
    yield running
    running.stop()


@pytest.mark.asyncio
async def test_thousands_of_hostile_frames_get_their_documented_answers_and_others_are_unaffected(
    server: RunningServer,
) -> None:
    baseline = await asyncio.to_thread(server.state)
    rng = random.Random(SEED)
    tally = Tally()
    client = FuzzClient(server, rng, tally)
    stop = asyncio.Event()
    async with asyncio.timeout(480):
        async with asyncio.TaskGroup() as tasks:
            healthy = tasks.create_task(_well_behaved(server, stop))
            ready = tasks.create_task(_poll_ready(server, stop))
            try:
                while tally.frames < MESSAGES:
                    await client.connection()
            finally:
                stop.set()
        state = await server.wait_for(
            lambda s: not s["sessions"] and s["engines"]["tiny"]["queue_depth"] == 0 and s["clients"] == 0
        )
        _, metrics = await asyncio.to_thread(server.get, "/metrics")
    print(f"\nfuzz seed {SEED}: {tally.frames} frames over {tally.connections} connections")
    for label, n in sorted(tally.answers.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>5}  {label}")
    print(f"  close codes: {dict(sorted(tally.close_codes.items()))}")
    print(f"  longest wait for a batch's `flushed`: {tally.longest_batch_s:.1f} s")
    sizes = healthy.result()
    print(f"  the well-behaved session: {len(sizes)} rounds, {sizes[:1]} bytes of audio each")
    assert sizes and len(set(sizes)) == 1 and sizes[0] > 0, sizes  # the same audio, every round
    assert set(ready.result()) == {200}
    assert 'code="internal"' not in metrics
    assert 1011 not in tally.close_codes
    assert state["tasks"] <= baseline["tasks"] + 1, (state, baseline)  # +1: the request being served
