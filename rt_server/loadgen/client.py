"""One simulated listener: a real WebSocket session (`pace: realtime`, alignment on) that streams its turns and
plays what it receives on a virtual clock.

Per turn it sends its messages on schedule, then `flush`; it reads until that flush is answered, measuring time
to first audio (rt_server.loadgen.trigger) and underruns (rt_server.loadgen.playback); it waits until the turn
has played out plus `turn_gap_s`, then starts the next. After the last turn it sends `close` and reads to the
end. Timestamps are `time.perf_counter()` taken in this process as messages leave and arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from rt_server.client import StreamClient
from rt_server.loadgen.playback import PlayoutClock
from rt_server.loadgen.script import TurnScript
from rt_server.loadgen.trigger import Sent, SentMessage, find_trigger
from rt_server.protocol import ErrorEvent, Flushed, SegmentInfo

_BYTES_PER_SAMPLE: Final = 2  # the bench asks for pcm_s16le
# Speech starts at the first sample above -40 dBFS: Kokoro's boundary silences stay far below it.
SPEECH_THRESHOLD: Final = round(32767 * 10 ** (-40 / 20))


@dataclass(frozen=True)
class ClientOptions:
    voice: str | None = None
    model: str | None = None
    frame_ms: int = 20
    lead_ms: int = 500
    sample_rate_hz: int = 24_000
    turn_gap_s: float = 0.5  # silence between a turn's last played sample and the next turn's first message
    underrun_tolerance_s: float = 0.0
    turn_timeout_s: float = 300.0  # a turn not answered by then is abandoned (an error of the run)


@dataclass(frozen=True)
class TurnResult:
    ttfa_s: float | None  # trigger -> first frame (None: no audio, or the segment did not match the input)
    trigger: str | None  # the trigger's kind (rt_server.loadgen.trigger.TriggerKind)
    text_to_audio_s: float | None  # the turn's first message -> first frame
    speech_heard_s: float | None  # trigger -> when the first sample of speech plays (the first frame may be silence)
    first_segment_phonemes: int
    audio_s: float
    underruns: int
    underrun_s: float


@dataclass(frozen=True)
class SessionResult:
    turns: tuple[TurnResult, ...]
    errors: tuple[str, ...]  # error codes the server sent, and client-side failures
    close_code: int | None

    @property
    def audio_s(self) -> float:
        return sum(t.audio_s for t in self.turns)


@dataclass
class _Turn:
    flush_id: str
    messages: list[SentMessage] = field(default_factory=list)
    first_segment: str | None = None
    first_frame_at: float | None = None
    speech_heard_at: float | None = None
    audio_s: float = 0.0


class _Listener:
    def __init__(self, client: StreamClient, options: ClientOptions) -> None:
        self.client = client
        self.options = options
        self.clock = PlayoutClock(tolerance_s=options.underrun_tolerance_s)
        self.errors: list[str] = []
        self.bytes_per_s = client.ready.sample_rate_hz * _BYTES_PER_SAMPLE

    async def turn(self, script: TurnScript, flush_id: str) -> TurnResult:
        turn = _Turn(flush_id)
        underruns, underrun_s = self.clock.underruns, self.clock.underrun_s
        async with asyncio.timeout(self.options.turn_timeout_s), asyncio.TaskGroup() as tasks:
            tasks.create_task(self._send(script, turn))
            tasks.create_task(self._receive(turn))
        result = self._result(turn, self.clock.underruns - underruns, self.clock.underrun_s - underrun_s)
        playout_end = self.clock.playout_end
        self.clock.end_turn()
        if playout_end is not None:  # the listener hears the turn out before the next one starts
            await asyncio.sleep(max(0.0, playout_end - time.perf_counter()))
        await asyncio.sleep(self.options.turn_gap_s)
        return result

    async def _send(self, script: TurnScript, turn: _Turn) -> None:
        started = time.perf_counter()
        for index, text in enumerate(script.messages):
            await asyncio.sleep(max(0.0, started + index * script.interval_s - time.perf_counter()))
            turn.messages.append(SentMessage(Sent.PHONEMES, text, time.perf_counter()))
            await self.client.send_phonemes(text)
        turn.messages.append(SentMessage(Sent.FLUSH, "", time.perf_counter()))
        await self.client.flush(turn.flush_id)

    async def _receive(self, turn: _Turn) -> None:
        while True:
            item = await self.client.receive()
            now = time.perf_counter()
            if item is None:
                raise ConnectionError(f"the server closed the session (close {self.client.close_code})")
            if isinstance(item, bytes):
                if turn.first_frame_at is None:
                    turn.first_frame_at = now
                duration_s = len(item) / self.bytes_per_s
                turn.audio_s += duration_s
                plays_at = self.clock.on_frame(now, duration_s)
                if turn.speech_heard_at is None:
                    loud = np.flatnonzero(np.abs(np.frombuffer(item, "<i2").astype(np.int32)) > SPEECH_THRESHOLD)
                    if len(loud):
                        rate = self.bytes_per_s / _BYTES_PER_SAMPLE
                        turn.speech_heard_at = plays_at + float(loud[0]) / rate
            elif isinstance(item, SegmentInfo):
                if turn.first_segment is None:
                    turn.first_segment = item.phonemes
            elif isinstance(item, Flushed) and item.id == turn.flush_id:
                return
            elif isinstance(item, ErrorEvent):
                self.errors.append(item.code.value)

    def _result(self, turn: _Turn, underruns: int, underrun_s: float) -> TurnResult:
        ttfa_s = speech_s = text_to_audio_s = None
        trigger_kind = None
        if turn.first_frame_at is not None and turn.messages:
            text_to_audio_s = turn.first_frame_at - turn.messages[0].sent_at
            if turn.first_segment is not None:
                trigger = find_trigger(turn.messages, turn.first_segment, turn.first_frame_at)
                if trigger is not None:
                    ttfa_s = turn.first_frame_at - trigger.sent_at
                    trigger_kind = trigger.kind.value
                    if turn.speech_heard_at is not None:
                        speech_s = turn.speech_heard_at - trigger.sent_at
        return TurnResult(
            ttfa_s=ttfa_s,
            trigger=trigger_kind,
            text_to_audio_s=text_to_audio_s,
            speech_heard_s=speech_s,
            first_segment_phonemes=len(turn.first_segment or ""),
            audio_s=turn.audio_s,
            underruns=underruns,
            underrun_s=underrun_s,
        )


async def run_session(url: str, scripts: Sequence[TurnScript], options: ClientOptions) -> SessionResult:
    """Open a session, play every turn, close. Failures are reported in the result, not raised."""
    turns: list[TurnResult] = []
    errors: list[str] = []
    close_code: int | None = None
    try:
        async with StreamClient.connect(
            url,
            voice=options.voice,
            model=options.model,
            sample_rate_hz=options.sample_rate_hz,
            frame_ms=options.frame_ms,
            pace="realtime",
            lead_ms=options.lead_ms,
            alignment=True,
        ) as client:
            listener = _Listener(client, options)
            try:
                for index, script in enumerate(scripts):
                    turns.append(await listener.turn(script, f"turn-{index}"))
                await client.close()
                async with asyncio.timeout(options.turn_timeout_s):
                    while await client.receive() is not None:
                        pass
            finally:
                errors.extend(listener.errors)
                close_code = client.close_code
    except Exception as exc:  # one failed session is a figure of the run, not the end of the bench
        errors.append(f"client: {type(exc).__name__}: {exc}")
    return SessionResult(tuple(turns), tuple(errors), close_code)
