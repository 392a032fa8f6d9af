"""Protocol v1: the pure wire format of `GET /v1/stream` (see docs/protocol.md).

Client messages are text frames holding one JSON object with a `type`; server audio is binary frames; server
events are text frames holding one JSON object with a `type`. This module parses and encodes them, validates
field values, and owns the close codes and the single mapping from error codes to close codes. No I/O.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

PROTOCOL_VERSION: Final = 1

Encoding = Literal["pcm_s16le", "pcm_f32le", "mulaw"]
Pace = Literal["none", "realtime"]
ENCODINGS: Final[tuple[Encoding, ...]] = ("pcm_s16le", "pcm_f32le", "mulaw")
PACES: Final[tuple[Pace, ...]] = ("none", "realtime")
SAMPLE_RATES_HZ: Final = (8000, 16000, 24000, 48000)
SPEED_RANGE: Final = (0.5, 2.0)
FRAME_MS_RANGE: Final = (10, 200)
LEAD_MS_RANGE: Final = (0, 10_000)
# A flush id is echoed back verbatim; bound it so an echo never costs more than a short string.
MAX_FLUSH_ID_CHARS: Final = 128
# Close reasons are limited to 123 bytes by RFC 6455 section 5.5 (125-byte control payload minus the code).
MAX_CLOSE_REASON_BYTES: Final = 123


class CloseCode(enum.IntEnum):
    """Every WebSocket close code the server uses (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    UNSUPPORTED_DATA = 1003  # binary frame from a client
    INVALID_PAYLOAD = 1007  # malformed JSON, not an object, unknown `type`
    POLICY_VIOLATION = 1008  # first message not `start`, invalid `start`, auth, origin, stalled, idle
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011  # sent with no reason text
    TRY_AGAIN_LATER = 1013  # at capacity (the server's or this client's limit)


class ErrorCode(enum.StrEnum):
    """The `code` of an `error` event. `close_code_for` says whether and how the session then closes."""

    BINARY_FRAME = "binary_frame"
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    INVALID_FIELD = "invalid_field"
    START_REQUIRED = "start_required"
    START_TIMEOUT = "start_timeout"
    INVALID_START = "invalid_start"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VOICE = "unknown_voice"
    ALREADY_STARTED = "already_started"
    UNEXPECTED_MESSAGE = "unexpected_message"
    UNKNOWN_SYMBOLS = "unknown_symbols"
    WORD_TOO_LONG = "word_too_long"
    INPUT_OVERFLOW = "input_overflow"
    MESSAGE_TOO_LARGE = "message_too_large"
    SYNTHESIS_FAILED = "synthesis_failed"
    STALLED = "stalled"
    IDLE_TIMEOUT = "idle_timeout"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN_ORIGIN = "forbidden_origin"
    AT_CAPACITY = "at_capacity"
    CLIENT_AT_CAPACITY = "client_at_capacity"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


# The one mapping from errors to close codes. None: the offending message is rejected and the session goes on.
_CLOSE_CODE_FOR_ERROR: Final[dict[ErrorCode, CloseCode | None]] = {
    ErrorCode.BINARY_FRAME: CloseCode.UNSUPPORTED_DATA,
    ErrorCode.INVALID_JSON: CloseCode.INVALID_PAYLOAD,
    ErrorCode.INVALID_MESSAGE: CloseCode.INVALID_PAYLOAD,
    ErrorCode.INVALID_FIELD: None,
    ErrorCode.START_REQUIRED: CloseCode.POLICY_VIOLATION,
    ErrorCode.START_TIMEOUT: CloseCode.POLICY_VIOLATION,
    ErrorCode.INVALID_START: CloseCode.POLICY_VIOLATION,
    ErrorCode.UNKNOWN_MODEL: CloseCode.POLICY_VIOLATION,
    ErrorCode.UNKNOWN_VOICE: CloseCode.POLICY_VIOLATION,
    ErrorCode.ALREADY_STARTED: None,
    ErrorCode.UNEXPECTED_MESSAGE: None,
    ErrorCode.UNKNOWN_SYMBOLS: None,
    ErrorCode.WORD_TOO_LONG: None,
    ErrorCode.INPUT_OVERFLOW: None,
    ErrorCode.MESSAGE_TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.SYNTHESIS_FAILED: None,
    ErrorCode.STALLED: CloseCode.POLICY_VIOLATION,
    ErrorCode.IDLE_TIMEOUT: CloseCode.POLICY_VIOLATION,
    ErrorCode.UNAUTHORIZED: CloseCode.POLICY_VIOLATION,
    ErrorCode.FORBIDDEN_ORIGIN: CloseCode.POLICY_VIOLATION,
    ErrorCode.AT_CAPACITY: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.CLIENT_AT_CAPACITY: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.SHUTTING_DOWN: CloseCode.GOING_AWAY,
    ErrorCode.INTERNAL: CloseCode.INTERNAL_ERROR,
}


def close_code_for(code: ErrorCode) -> CloseCode | None:
    """The close code that follows an `error` with this code, or None when the session goes on."""
    return _CLOSE_CODE_FOR_ERROR[code]


def close_reason_for(code: ErrorCode) -> str:
    """The close frame's reason text: the error code itself, except for 1011 which carries none."""
    return "" if close_code_for(code) is CloseCode.INTERNAL_ERROR else code.value


class ProtocolError(Exception):
    """A client message that cannot be accepted; `code` decides, through `close_code_for`, what follows."""

    def __init__(self, code: ErrorCode, message: str, *, symbols: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.symbols = symbols


# ---------------------------------------------------------------------------------------------------------
# Client to server


@dataclass(frozen=True)
class Start:
    """`start`, the first message. None for `model`/`voice`: the server's default / the model's default."""

    voice: str | None = None
    speed: float = 1.0
    model: str | None = None
    encoding: Encoding = "pcm_s16le"
    sample_rate_hz: int = 24_000
    frame_ms: int = 20
    pace: Pace = "none"
    lead_ms: int = 500
    alignment: bool = False
    ignored_fields: tuple[str, ...] = ()  # unknown fields, answered with a `warning`


@dataclass(frozen=True)
class Phonemes:
    text: str


@dataclass(frozen=True)
class Flush:
    id: str | int | None = None


@dataclass(frozen=True)
class Clear:
    pass


@dataclass(frozen=True)
class Close:
    pass


ClientMessage = Start | Phonemes | Flush | Clear | Close

_START_FIELDS: Final = frozenset(
    {"type", "voice", "speed", "model", "encoding", "sample_rate", "frame_ms", "pace", "lead_ms", "alignment"}
)


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Parse one client frame. Raises `ProtocolError` with the documented code for anything not acceptable."""
    if isinstance(raw, bytes):
        raise ProtocolError(ErrorCode.BINARY_FRAME, "binary frames are not accepted; send JSON text frames")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
        raise ProtocolError(ErrorCode.INVALID_JSON, f"malformed JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message must be a JSON object")
    kind = obj.get("type")
    if kind == "start":
        return _parse_start(obj)
    if kind == "phonemes":
        text = obj.get("text")
        if not isinstance(text, str):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "`phonemes.text` must be a string")
        return Phonemes(text=text)
    if kind == "flush":
        flush_id = obj.get("id")
        if flush_id is not None and not (isinstance(flush_id, str | int) and not isinstance(flush_id, bool)):
            raise ProtocolError(ErrorCode.INVALID_FIELD, "`flush.id` must be a string or an integer")
        if isinstance(flush_id, str) and len(flush_id) > MAX_FLUSH_ID_CHARS:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"`flush.id` is longer than {MAX_FLUSH_ID_CHARS}")
        if isinstance(flush_id, int) and abs(flush_id) >= 2**53:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "`flush.id` must be an integer below 2**53")
        return Flush(id=flush_id)
    if kind == "clear":
        return Clear()
    if kind == "close":
        return Close()
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "a message needs a string `type`")
    raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"unknown message type {kind[:40]!r}")


def _invalid_start(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_START, message)


def _number(obj: dict[str, Any], key: str, default: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid_start(f"`{key}` must be a finite number")
    return float(value)


def _integer(obj: dict[str, Any], key: str, default: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_start(f"`{key}` must be an integer")
    return value


def _optional_name(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise _invalid_start(f"`{key}` must be a non-empty string of at most 256 characters")
    return value


def _parse_start(obj: dict[str, Any]) -> Start:
    speed = _number(obj, "speed", 1.0)
    if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
        raise _invalid_start(f"`speed` must be within {SPEED_RANGE[0]}..{SPEED_RANGE[1]}")
    encoding = obj.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise _invalid_start(f"`encoding` must be one of {', '.join(ENCODINGS)}")
    sample_rate_hz = _integer(obj, "sample_rate", 24_000)
    if sample_rate_hz not in SAMPLE_RATES_HZ:
        raise _invalid_start(f"`sample_rate` must be one of {', '.join(map(str, SAMPLE_RATES_HZ))}")
    frame_ms = _integer(obj, "frame_ms", 20)
    if not FRAME_MS_RANGE[0] <= frame_ms <= FRAME_MS_RANGE[1]:
        raise _invalid_start(f"`frame_ms` must be an integer within {FRAME_MS_RANGE[0]}..{FRAME_MS_RANGE[1]}")
    pace = obj.get("pace", "none")
    if pace not in PACES:
        raise _invalid_start(f"`pace` must be one of {', '.join(PACES)}")
    lead_ms = _integer(obj, "lead_ms", 500)
    if not LEAD_MS_RANGE[0] <= lead_ms <= LEAD_MS_RANGE[1]:
        raise _invalid_start(f"`lead_ms` must be an integer within {LEAD_MS_RANGE[0]}..{LEAD_MS_RANGE[1]}")
    alignment = obj.get("alignment", False)
    if not isinstance(alignment, bool):
        raise _invalid_start("`alignment` must be true or false")
    ignored = tuple(sorted(str(k)[:40] for k in obj if k not in _START_FIELDS))[:16]
    return Start(
        voice=_optional_name(obj, "voice"),
        speed=speed,
        model=_optional_name(obj, "model"),
        encoding=encoding,
        sample_rate_hz=sample_rate_hz,
        frame_ms=frame_ms,
        pace=pace,
        lead_ms=lead_ms,
        alignment=alignment,
        ignored_fields=ignored,
    )


def encode_client_message(message: ClientMessage) -> str:
    """The JSON text frame for a client message (used by `rt_server.client`)."""
    if isinstance(message, Start):
        obj: dict[str, Any] = {
            "type": "start",
            "speed": message.speed,
            "encoding": message.encoding,
            "sample_rate": message.sample_rate_hz,
            "frame_ms": message.frame_ms,
            "pace": message.pace,
            "lead_ms": message.lead_ms,
            "alignment": message.alignment,
        }
        if message.voice is not None:
            obj["voice"] = message.voice
        if message.model is not None:
            obj["model"] = message.model
    elif isinstance(message, Phonemes):
        obj = {"type": "phonemes", "text": message.text}
    elif isinstance(message, Flush):
        obj = {"type": "flush"} if message.id is None else {"type": "flush", "id": message.id}
    elif isinstance(message, Clear):
        obj = {"type": "clear"}
    else:
        obj = {"type": "close"}
    return _dumps(obj)


# ---------------------------------------------------------------------------------------------------------
# Server to client


@dataclass(frozen=True)
class Limits:
    """The limits that apply to a session, reported in `ready`."""

    max_message_bytes: int
    max_pending_phonemes: int
    max_segment_phonemes: int
    max_buffer_ms: int
    stall_timeout_s: float
    idle_cut_ms: int
    idle_timeout_s: float = 0.0  # 0: no idle timeout


@dataclass(frozen=True)
class Ready:
    session_id: str
    model: str
    voice: str
    speed: float
    encoding: Encoding
    sample_rate_hz: int
    frame_ms: int
    pace: Pace
    lead_ms: int
    alignment: bool
    limits: Limits
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class SegmentInfo:
    """`segment` (alignment on): sent before the segment's first audio frame.

    Times are in the session's audio timeline in ms; `timings[i]` is the (start, end) of code point
    `phonemes[i]`, from the predicted durations.
    """

    seq: int
    phonemes: str
    start_ms: float
    duration_ms: float
    timings: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Flushed:
    id: str | int | None = None


@dataclass(frozen=True)
class Cleared:
    pass


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class ErrorEvent:
    code: ErrorCode
    message: str
    symbols: tuple[str, ...] = ()

    @property
    def close_code(self) -> CloseCode | None:
        return close_code_for(self.code)


@dataclass(frozen=True)
class WarningEvent:
    code: str
    message: str


ServerEvent = Ready | SegmentInfo | Flushed | Cleared | Done | ErrorEvent | WarningEvent


def error_from(exc: ProtocolError) -> ErrorEvent:
    return ErrorEvent(code=exc.code, message=exc.message, symbols=exc.symbols)


def encode_event(event: ServerEvent) -> str:
    """The JSON text frame for a server event."""
    obj: dict[str, Any]
    if isinstance(event, Ready):
        obj = {
            "type": "ready",
            "protocol_version": event.protocol_version,
            "session_id": event.session_id,
            "settings": {
                "model": event.model,
                "voice": event.voice,
                "speed": event.speed,
                "encoding": event.encoding,
                "sample_rate": event.sample_rate_hz,
                "frame_ms": event.frame_ms,
                "pace": event.pace,
                "lead_ms": event.lead_ms,
                "alignment": event.alignment,
            },
            "limits": {
                "max_message_bytes": event.limits.max_message_bytes,
                "max_pending_phonemes": event.limits.max_pending_phonemes,
                "max_segment_phonemes": event.limits.max_segment_phonemes,
                "max_buffer_ms": event.limits.max_buffer_ms,
                "stall_timeout_s": event.limits.stall_timeout_s,
                "idle_cut_ms": event.limits.idle_cut_ms,
                "idle_timeout_s": event.limits.idle_timeout_s,
            },
        }
    elif isinstance(event, SegmentInfo):
        obj = {
            "type": "segment",
            "seq": event.seq,
            "phonemes": event.phonemes,
            "start_ms": round(event.start_ms, 3),
            "duration_ms": round(event.duration_ms, 3),
            "timings": [[round(a, 3), round(b, 3)] for a, b in event.timings],
        }
    elif isinstance(event, Flushed):
        obj = {"type": "flushed", "id": event.id}
    elif isinstance(event, Cleared):
        obj = {"type": "cleared"}
    elif isinstance(event, Done):
        obj = {"type": "done"}
    elif isinstance(event, ErrorEvent):
        obj = {"type": "error", "code": event.code.value, "message": event.message}
        if event.close_code is not None:
            obj["close_code"] = int(event.close_code)
        if event.symbols:
            obj["symbols"] = list(event.symbols)
    else:
        obj = {"type": "warning", "code": event.code, "message": event.message}
    return _dumps(obj)


def parse_server_event(raw: str) -> ServerEvent:
    """Parse a server event (used by `rt_server.client`). Raises ValueError on anything unknown."""
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("a server event must be a JSON object")
    kind = obj.get("type")
    if kind == "ready":
        lim, cfg = obj["limits"], obj["settings"]
        return Ready(
            session_id=obj["session_id"],
            model=cfg["model"],
            voice=cfg["voice"],
            speed=float(cfg["speed"]),
            encoding=cfg["encoding"],
            sample_rate_hz=int(cfg["sample_rate"]),
            frame_ms=int(cfg["frame_ms"]),
            pace=cfg["pace"],
            lead_ms=int(cfg["lead_ms"]),
            alignment=bool(cfg["alignment"]),
            limits=Limits(
                max_message_bytes=int(lim["max_message_bytes"]),
                max_pending_phonemes=int(lim["max_pending_phonemes"]),
                max_segment_phonemes=int(lim["max_segment_phonemes"]),
                max_buffer_ms=int(lim["max_buffer_ms"]),
                stall_timeout_s=float(lim["stall_timeout_s"]),
                idle_cut_ms=int(lim["idle_cut_ms"]),
                idle_timeout_s=float(lim.get("idle_timeout_s", 0.0)),
            ),
            protocol_version=int(obj["protocol_version"]),
        )
    if kind == "segment":
        return SegmentInfo(
            seq=int(obj["seq"]),
            phonemes=obj["phonemes"],
            start_ms=float(obj["start_ms"]),
            duration_ms=float(obj["duration_ms"]),
            timings=tuple((float(a), float(b)) for a, b in obj["timings"]),
        )
    if kind == "flushed":
        return Flushed(id=obj.get("id"))
    if kind == "cleared":
        return Cleared()
    if kind == "done":
        return Done()
    if kind == "error":
        return ErrorEvent(code=ErrorCode(obj["code"]), message=obj["message"], symbols=tuple(obj.get("symbols", ())))
    if kind == "warning":
        return WarningEvent(code=obj["code"], message=obj["message"])
    raise ValueError(f"unknown server event type {kind!r}")


def _dumps(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate echoed from client input: escape it, stay valid UTF-8
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)
    return text
