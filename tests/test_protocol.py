"""Protocol v1 wire format: parsing, validation, error-to-close-code mapping, event encoding."""

from __future__ import annotations

import json

import pytest

from rt_server.protocol import (
    Clear,
    Cleared,
    Close,
    CloseCode,
    Done,
    ErrorCode,
    ErrorEvent,
    Flush,
    Flushed,
    Limits,
    Phonemes,
    ProtocolError,
    Ready,
    SegmentInfo,
    Start,
    WarningEvent,
    close_code_for,
    close_reason_for,
    encode_client_message,
    encode_event,
    parse_client_message,
    parse_server_event,
)


def _code(raw: str | bytes) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        parse_client_message(raw)
    return info.value.code


def test_start_defaults() -> None:
    assert parse_client_message('{"type":"start"}') == Start()


def test_start_all_fields() -> None:
    raw = json.dumps(
        {
            "type": "start",
            "voice": "af_bella:0.7,af_sky:0.3",
            "speed": 1.5,
            "model": "m2",
            "encoding": "mulaw",
            "sample_rate": 8000,
            "frame_ms": 40,
            "pace": "realtime",
            "lead_ms": 250,
            "alignment": True,
            "colour": "blue",
        }
    )
    start = parse_client_message(raw)
    assert start == Start(
        voice="af_bella:0.7,af_sky:0.3",
        speed=1.5,
        model="m2",
        encoding="mulaw",
        sample_rate_hz=8000,
        frame_ms=40,
        pace="realtime",
        lead_ms=250,
        alignment=True,
        ignored_fields=("colour",),
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"speed": 0.49},
        {"speed": 2.01},
        {"speed": True},
        {"speed": "fast"},
        {"encoding": "opus"},
        {"sample_rate": 44100},
        {"sample_rate": "24000"},
        {"frame_ms": 9},
        {"frame_ms": 201},
        {"frame_ms": 20.5},
        {"pace": "fast"},
        {"lead_ms": -1},
        {"lead_ms": 10_001},
        {"alignment": 1},
        {"voice": ""},
        {"voice": 3},
        {"model": "x" * 300},
    ],
)
def test_start_rejects_bad_values_with_1008(fields: dict[str, object]) -> None:
    code = _code(json.dumps({"type": "start", **fields}))
    assert code is ErrorCode.INVALID_START
    assert close_code_for(code) is CloseCode.POLICY_VIOLATION


def test_other_messages() -> None:
    assert parse_client_message('{"type":"phonemes","text":"a b"}') == Phonemes("a b")
    assert parse_client_message('{"type":"flush"}') == Flush(None)
    assert parse_client_message('{"type":"flush","id":"x"}') == Flush("x")
    assert parse_client_message('{"type":"flush","id":3}') == Flush(3)
    assert parse_client_message('{"type":"clear"}') == Clear()
    assert parse_client_message('{"type":"close"}') == Close()


@pytest.mark.parametrize(
    ("raw", "code", "close"),
    [
        (b"\x00\x01", ErrorCode.BINARY_FRAME, CloseCode.UNSUPPORTED_DATA),
        ("{not json", ErrorCode.INVALID_JSON, CloseCode.INVALID_PAYLOAD),
        ("[1,2]", ErrorCode.INVALID_MESSAGE, CloseCode.INVALID_PAYLOAD),
        ('"start"', ErrorCode.INVALID_MESSAGE, CloseCode.INVALID_PAYLOAD),
        ('{"text":"a"}', ErrorCode.INVALID_MESSAGE, CloseCode.INVALID_PAYLOAD),
        ('{"type":"speak"}', ErrorCode.INVALID_MESSAGE, CloseCode.INVALID_PAYLOAD),
        ('{"type":7}', ErrorCode.INVALID_MESSAGE, CloseCode.INVALID_PAYLOAD),
        ("[" * 100_000, ErrorCode.INVALID_JSON, CloseCode.INVALID_PAYLOAD),
        ('{"type":"start","frame_ms":' + "9" * 5000 + "}", ErrorCode.INVALID_JSON, CloseCode.INVALID_PAYLOAD),
        ('{"type":"phonemes","text":5}', ErrorCode.INVALID_FIELD, None),
        ('{"type":"phonemes"}', ErrorCode.INVALID_FIELD, None),
        ('{"type":"flush","id":true}', ErrorCode.INVALID_FIELD, None),
        ('{"type":"flush","id":1.5}', ErrorCode.INVALID_FIELD, None),
        ('{"type":"flush","id":' + str(2**60) + "}", ErrorCode.INVALID_FIELD, None),
        (json.dumps({"type": "flush", "id": "x" * 129}), ErrorCode.INVALID_FIELD, None),
    ],
)
def test_invalid_messages_map_to_documented_codes(raw: str | bytes, code: ErrorCode, close: CloseCode | None) -> None:
    assert _code(raw) is code
    assert close_code_for(code) == close


def test_every_error_code_has_a_close_mapping_and_1011_has_no_reason() -> None:
    for code in ErrorCode:
        close = close_code_for(code)  # raises KeyError if a code were unmapped
        if close is CloseCode.INTERNAL_ERROR:
            assert close_reason_for(code) == ""
        elif close is not None:
            assert close_reason_for(code) == code.value
            assert len(code.value.encode()) <= 123
    assert close_code_for(ErrorCode.AT_CAPACITY) is CloseCode.TRY_AGAIN_LATER
    assert close_code_for(ErrorCode.SHUTTING_DOWN) is CloseCode.GOING_AWAY
    assert close_code_for(ErrorCode.MESSAGE_TOO_LARGE) is CloseCode.MESSAGE_TOO_BIG
    assert close_code_for(ErrorCode.START_REQUIRED) is CloseCode.POLICY_VIOLATION


def test_client_messages_round_trip() -> None:
    messages = [
        Start(voice="af_test", speed=1.25, model="tiny", encoding="pcm_f32le", sample_rate_hz=16000, frame_ms=40),
        Start(),
        Phonemes("hə lˈoʊ"),
        Flush(None),
        Flush("a"),
        Flush(9),
        Clear(),
        Close(),
    ]
    for message in messages:
        assert parse_client_message(encode_client_message(message)) == message


def test_server_events_round_trip() -> None:
    limits = Limits(65536, 4096, 510, 2000, 10.0, 500)
    events = [
        Ready("abc", "tiny", "af_test", 1.0, "pcm_s16le", 24000, 20, "none", 500, False, limits),
        SegmentInfo(3, "ab", 100.0, 150.0, ((125.0, 150.0), (150.0, 200.0))),
        Flushed("x"),
        Flushed(None),
        Cleared(),
        Done(),
        ErrorEvent(ErrorCode.UNKNOWN_SYMBOLS, "bad", ("1", "é")),
        WarningEvent("unknown_fields", "ignored: x"),
    ]
    for event in events:
        assert parse_server_event(encode_event(event)) == event


def test_error_event_names_its_close_code() -> None:
    fatal = json.loads(encode_event(ErrorEvent(ErrorCode.INVALID_JSON, "x")))
    assert fatal == {"type": "error", "code": "invalid_json", "message": "x", "close_code": 1007}
    benign = json.loads(encode_event(ErrorEvent(ErrorCode.INPUT_OVERFLOW, "y")))
    assert "close_code" not in benign


def test_events_stay_valid_utf8_when_echoing_lone_surrogates() -> None:
    text = encode_event(ErrorEvent(ErrorCode.UNKNOWN_SYMBOLS, "bad \ud800", ("\ud800",)))
    text.encode("utf-8")  # would raise for a raw surrogate
    assert json.loads(text)["symbols"] == ["\ud800"]
    assert "ə" in encode_event(Flushed("ə"))  # normal text is not escaped
