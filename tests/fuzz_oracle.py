"""What the server must answer to any client frame, written from docs/protocol.md, for the fuzz test.

`classify` takes one frame and what the connection's state is, and says what the documented answer is: accepted
(with what it produces), rejected with an error while the session goes on, fatal (an `error` then a close with
the mapped code), or refused by the WebSocket layer itself (a close without an `error`). Where the documented
answer depends on something the client cannot know exactly (how much input is still pending), it lists every
documented answer that could apply.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

Kind = Literal["ok", "reject", "fatal", "bare", "done"]

# The mapping of docs/protocol.md "Errors and close codes" (written out again here, not imported).
FATAL_CLOSE: Final = {
    "binary_frame": 1003,
    "invalid_json": 1007,
    "invalid_message": 1007,
    "start_required": 1008,
    "invalid_start": 1008,
    "unknown_model": 1008,
    "unknown_voice": 1008,
    "message_too_large": 1009,
}
MAX_SEGMENT_PHONEMES: Final = 510
_WORD: Final = re.compile(r"\S+")
_TRAILING_WORD: Final = re.compile(r"\S*\Z")
_LEADING_WORD: Final = re.compile(r"\A\S*")


@dataclass(frozen=True)
class Expect:
    kind: Kind
    code: str | None = None  # the error code (reject, fatal)
    close_code: int | None = None  # fatal, bare, done
    alternatives: tuple[Expect, ...] = ()  # when set, any one of these is documented
    flushed: tuple[Any, ...] = ()  # ok: a flush to be answered with this id (a 1-tuple)
    cleared: bool = False
    ready: bool = False
    warning: bool = False
    audio: bool = False  # ok: accepted phonemes that may produce audio
    text: str = ""  # accepted phonemes


@dataclass
class ConnectionState:
    """What the client knows of its session. `pending_max` bounds the pending input from above: accepted text
    since the last sync point (the server may have synthesised some of it already)."""

    started: bool = False
    closing: bool = False
    pending_max: int = 0
    tail_word: int = 0  # length of the word the buffered input ends in (words join across messages)
    flushes_since_clear: list[Any] = field(default_factory=list)

    def synced(self) -> None:
        """Everything sent so far was answered: nothing is pending."""
        self.pending_max, self.tail_word = 0, 0

    def after(self, expect: Expect) -> None:
        if expect.ready:
            self.started = True
        if expect.kind == "done":
            self.closing = True
        if expect.cleared:
            self.pending_max, self.tail_word = 0, 0
        if expect.flushed:
            self.tail_word = 0  # a flush cuts everything buffered (it stays pending until synthesised)
        if expect.text:
            self.pending_max += len(expect.text)
            trailing = _TRAILING_WORD.search(expect.text)
            joined = trailing is not None and len(trailing.group()) == len(expect.text)
            self.tail_word = self.tail_word + len(expect.text) if joined else len(trailing.group() if trailing else "")


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    max_pending_phonemes: int
    vocabulary: frozenset[str]
    voices_good: frozenset[str]  # names and blends known to be accepted
    voices_bad: frozenset[str]  # known to be refused
    models: frozenset[str]

    @property
    def websocket_max_bytes(self) -> int:
        return 4 * self.max_message_bytes


def _fatal(code: str) -> Expect:
    return Expect("fatal", code, FATAL_CLOSE[code])


def _reject(code: str) -> Expect:
    return Expect("reject", code)


def classify(frame: str | bytes, state: ConnectionState, limits: Limits, *, binary: bool) -> Expect:
    """The documented answer to `frame` (a text frame's payload, or a binary frame's when `binary`)."""
    if isinstance(frame, bytes) and not binary:  # a text frame that is not UTF-8
        try:
            frame = frame.decode("utf-8")
        except UnicodeDecodeError:
            return Expect("bare", close_code=1007)
    size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
    if size > limits.websocket_max_bytes:
        return Expect("bare", close_code=1009)
    if state.closing:
        return Expect("ok")  # after `close`, messages are ignored
    if size > limits.max_message_bytes:
        return _fatal("message_too_large")
    if isinstance(frame, bytes):
        return _fatal("binary_frame")
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        return _fatal("invalid_json")
    if not isinstance(obj, dict):
        return _fatal("invalid_message")
    kind = obj.get("type")
    if kind == "start":
        return _start(obj, state, limits)
    if kind == "phonemes":
        text = obj.get("text")
        if not isinstance(text, str):
            return _reject("invalid_field")
        if not state.started:
            return _fatal("start_required")
        return _phonemes(text, state, limits)
    if kind == "flush":
        flush_id = obj.get("id")
        valid = flush_id is None or (isinstance(flush_id, str) and len(flush_id) <= 128)
        valid |= isinstance(flush_id, int) and not isinstance(flush_id, bool) and abs(flush_id) < 2**53
        if not valid:
            return _reject("invalid_field")
        return Expect("ok", flushed=(flush_id,)) if state.started else _fatal("start_required")
    if kind in ("clear", "close"):
        if not state.started:
            return _fatal("start_required")
        return Expect("ok", cleared=True) if kind == "clear" else Expect("done", close_code=1000)
    return _fatal("invalid_message")


def _phonemes(text: str, state: ConnectionState, limits: Limits) -> Expect:
    unknown = [c for c in dict.fromkeys(text) if c not in limits.vocabulary and not c.isspace()]
    if unknown:
        return _reject("unknown_symbols")
    leading = _LEADING_WORD.match(text)
    joined = state.tail_word + (len(leading.group()) if leading else 0)
    longest = max((len(m.group()) for m in _WORD.finditer(text)), default=0)
    if longest > MAX_SEGMENT_PHONEMES:
        return _reject("word_too_long")
    accepted = Expect("ok", audio=bool(text.strip()), text=text)
    if len(text) > limits.max_pending_phonemes:
        return _reject("input_overflow")
    answers = [accepted]
    if state.pending_max + len(text) > limits.max_pending_phonemes:  # depends on synthesis progress
        answers.append(_reject("input_overflow"))
    if joined > MAX_SEGMENT_PHONEMES:  # unless an idle cut ended the buffered word meanwhile
        answers.insert(0, _reject("word_too_long"))
    return answers[0] if len(answers) == 1 else Expect("ok", alternatives=tuple(answers))


def _number_ok(value: Any, low: float, high: float) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return ok and low <= value <= high


def _integer_in(value: Any, allowed: Any) -> bool:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and value in allowed


def _name_ok(value: Any) -> bool:
    return value is None or (isinstance(value, str) and 0 < len(value) <= 256)


def _start(obj: dict[str, Any], state: ConnectionState, limits: Limits) -> Expect:
    fields_ok = (
        _number_ok(obj.get("speed", 1.0), 0.5, 2.0)
        and obj.get("encoding", "pcm_s16le") in ("pcm_s16le", "pcm_f32le", "mulaw")
        and _integer_in(obj.get("sample_rate", 24000), (8000, 16000, 24000, 48000))
        and _integer_in(obj.get("frame_ms", 20), range(10, 201))
        and obj.get("pace", "none") in ("none", "realtime")
        and _integer_in(obj.get("lead_ms", 500), range(10_001))
        and isinstance(obj.get("alignment", False), bool)
        and _name_ok(obj.get("voice"))
        and _name_ok(obj.get("model"))
    )
    if not fields_ok:
        return _fatal("invalid_start")
    if state.started:
        return _reject("already_started")
    if obj.get("model") is not None and obj["model"] not in limits.models:
        return _fatal("unknown_model")
    known = {"type", "voice", "speed", "model", "encoding", "sample_rate", "frame_ms", "pace", "lead_ms", "alignment"}
    ready = Expect("ok", ready=True, warning=any(k not in known for k in obj))
    voice = obj.get("voice")
    if voice is None or voice in limits.voices_good:
        return ready
    if voice in limits.voices_bad:
        return _fatal("unknown_voice")
    return Expect("ok", alternatives=(ready, _fatal("unknown_voice")))  # a mutated name: perhaps still valid
