"""One streaming session of protocol v1 (asyncio, no web framework: the socket is behind `Transport`).

A reader and a writer task, owned by one TaskGroup in `run`. Everything between them is synchronous: messages,
engine outcomes and timers update the session's state and queue output; the writer alone awaits the socket.

Input: the segmenter cuts appended phonemes into segments, submitted to the model's engine. Output: the playout
(rt_server.pipeline.playout) frames outcomes into the outbox within `max_buffer_ms`; the writer
(rt_server.pipeline.writer) sends it. Backpressure: the session reports consumed audio to the engine, whose
scheduler stops planning for it at `max_buffer_ms` of unsent audio and resumes below the low-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Mapping
from typing import Final

from rt_server.pipeline.audio_out import AudioOutput
from rt_server.pipeline.flow import Pacer
from rt_server.pipeline.jobs import Delivery, EngineFailed, SegmentAudio, SegmentJob
from rt_server.pipeline.outbox import AudioFrame, CloseFrame, Outbox, OutItem, TextEvent
from rt_server.pipeline.playout import Playout
from rt_server.pipeline.ports import SessionObserver, SynthesisBackend, Transport
from rt_server.pipeline.segmenter import Segmenter
from rt_server.pipeline.session_config import SessionConfig
from rt_server.pipeline.tickets import CloseTicket, FlushTicket, SegmentTicket
from rt_server.pipeline.writer import Writer, WriterExit
from rt_server.protocol import (
    Clear,
    Cleared,
    ClientMessage,
    Close,
    CloseCode,
    ErrorCode,
    ErrorEvent,
    Flush,
    Limits,
    Phonemes,
    ProtocolError,
    Ready,
    ServerEvent,
    Start,
    WarningEvent,
    close_code_for,
    close_reason_for,
    encode_event,
    error_from,
    parse_client_message,
)

log = logging.getLogger(__name__)

# Waiting for a stuck socket to take a close frame is pointless past this: the transport is abandoned.
_CLOSE_TIMEOUT_S: Final = 2.0


class State(enum.Enum):
    AWAITING_START = "awaiting_start"
    STREAMING = "streaming"
    CLOSING = "closing"  # `close`, shutdown or a fatal error: no more input, the writer finishes up
    ENDED = "ended"


class Session:
    def __init__(
        self,
        session_id: str,
        transport: Transport,
        backends: Mapping[str, SynthesisBackend],
        default_model: str,
        config: SessionConfig,
        observer: SessionObserver,
    ) -> None:
        self.session_id = session_id
        self._transport = transport
        self._backends = backends
        self._default_model = default_model
        self._config = config
        self._observer = observer
        self._log = logging.LoggerAdapter(log, {"session_id": session_id})
        self.state = State.AWAITING_START
        self.ended = asyncio.Event()
        self._wake = asyncio.Event()
        self._outbox = Outbox(config.max_control_events)
        self._room = asyncio.Event()  # set when the writer takes an item, or the session stops taking input
        self._writer: Writer | None = None
        self._backend: SynthesisBackend | None = None
        self._start: Start | None = None
        self._voice = ""
        self._segmenter: Segmenter | None = None
        self._playout: Playout | None = None  # from `start` on
        self._pacer = Pacer(lead_ms=0, enabled=False)
        self._next_seq = 0
        self._first_live_seq = 0  # outcomes of earlier segments were cleared: discard them
        self._received_ms = 0.0  # audio received from the engine, stale included
        self._reported_ms = 0.0
        self._ttfa_since: float | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._end_reason = ""
        self._engine_failed = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session until it closes or the peer goes; never raises for protocol or peer problems."""
        loop = asyncio.get_running_loop()
        self._timers["start"] = loop.call_later(self._config.start_timeout_s, self._on_start_timeout)
        try:
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self._read_loop(), name=f"session-{self.session_id}-reader")
                writer = tasks.create_task(self._write_loop(), name=f"session-{self.session_id}-writer")
                await self.ended.wait()
                reader.cancel()
                writer.cancel()
        except* Exception:
            self._log.exception("session %s failed", self.session_id)
            await self._close_internal_error()
        finally:
            self._end("finished")
            for timer in self._timers.values():
                timer.cancel()
            if self._backend is not None:
                self._backend.close_session(self.session_id)

    def _end(self, reason: str) -> None:
        if self.state is not State.ENDED:
            self.state = State.ENDED
            self._end_reason = reason
            self.ended.set()
            self._room.set()

    async def _close_internal_error(self) -> None:
        """Best effort: an `internal` error event and close 1011 with no reason text."""
        self._observer.on_error(ErrorCode.INTERNAL)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._transport.send_text(encode_event(ErrorEvent(ErrorCode.INTERNAL, "internal server error")))
                await self._transport.close(CloseCode.INTERNAL_ERROR, "")

    def begin_shutdown(self) -> None:
        """Server shutdown: take no more input, finish what is pending, then `error` + close 1001."""
        if self.state is State.AWAITING_START:
            self.fail(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        elif self.state is State.STREAMING:
            self._cut(force=True)
            self._add(CloseTicket(ErrorCode.SHUTTING_DOWN))
            self.state = State.CLOSING
            self._pump()

    def fail(self, code: ErrorCode, message: str) -> None:
        """A fatal error: drop pending work and output, send `error`, then close with the mapped code."""
        if self.state is State.ENDED:
            return
        close_code = close_code_for(code)
        assert close_code is not None, code
        self._observer.on_error(code)
        self.state = State.CLOSING
        self._cancel_timer("idle")
        self._drop_pending()
        self._outbox.clear_control()
        self._outbox.push_control(TextEvent(encode_event(ErrorEvent(code, message))))
        self._outbox.push_control(CloseFrame(close_code, close_reason_for(code)))
        self._wake.set()
        self._room.set()

    # -- reading -----------------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            await self._room_for_input()
            raw = await self._transport.receive()
            if raw is None:
                self._end("disconnected")
                return
            if self.state is not State.AWAITING_START and self.state is not State.STREAMING:
                continue  # closing: input is ignored until the writer has closed
            if self.state is State.STREAMING:
                self._arm_inactivity_timer()  # any message counts, a rejected one too
            size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
            if size > self._config.max_message_bytes:
                self.fail(ErrorCode.MESSAGE_TOO_LARGE, f"messages are limited to {self._config.max_message_bytes} B")
                continue
            try:
                message = parse_client_message(raw)
            except ProtocolError as exc:
                self._reject(exc)
                continue
            if self.state is State.AWAITING_START:
                if not isinstance(message, Start):
                    self.fail(ErrorCode.START_REQUIRED, "the first message must be `start`")
                    continue
                self._cancel_timer("start")  # it came in time, however long the voice check takes
                await self._on_start(message)
            else:
                self._on_message(message)

    async def _room_for_input(self) -> None:
        """Read no further while half of `max_control_events` control events wait for the client: each message
        adds at most a few, so a burst of messages pauses here until the writer catches up (control events go
        ahead of audio, so this never waits for paced audio; the socket's buffers push back on the client),
        instead of overflowing the control queue. A client that stops reading altogether is then found by the
        writer's stall timeout."""
        limit = self._config.max_queued_events
        while self._outbox.control_events >= limit and self.state in (State.AWAITING_START, State.STREAMING):
            self._room.clear()
            await self._room.wait()

    def _reject(self, exc: ProtocolError) -> None:
        if close_code_for(exc.code) is not None:
            self.fail(exc.code, exc.message)
        else:
            self._observer.on_error(exc.code)
            self._control(error_from(exc))

    async def _on_start(self, start: Start) -> None:
        model = start.model or self._default_model
        backend = self._backends.get(model)
        if backend is None:
            self.fail(ErrorCode.UNKNOWN_MODEL, f"unknown model {model!r}; known: {', '.join(self._backends)}")
            return
        voice = start.voice or backend.voices[0]
        problem = await backend.check_voice(voice)
        if self.state is not State.AWAITING_START:
            return  # the peer left, or the server began shutting down, while the voice was checked
        if problem is not None:
            self.fail(ErrorCode.UNKNOWN_VOICE, problem)
            return
        self._backend, self._start, self._voice = backend, start, voice
        self._segmenter = Segmenter(
            max_phonemes=backend.max_phonemes,
            first_segment_min_phonemes=min(self._config.first_segment_min_phonemes, backend.max_phonemes),
            clause_min_phonemes=min(self._config.clause_min_phonemes, backend.max_phonemes),
            short_first_segment=self._config.short_first_segment,
        )
        audio = AudioOutput(encoding=start.encoding, sample_rate_hz=start.sample_rate_hz, frame_ms=start.frame_ms)
        self._playout = Playout(
            self._outbox,
            audio,
            max_buffer_ms=self._config.max_buffer_ms,
            alignment=start.alignment,
            max_events=self._config.max_queued_events,
        )
        self._pacer = Pacer(lead_ms=start.lead_ms, enabled=start.pace == "realtime")
        backend.open_session(self.session_id, self._on_outcome)
        self.state = State.STREAMING
        limits = Limits(
            max_message_bytes=self._config.max_message_bytes,
            max_pending_phonemes=self._config.max_pending_phonemes,
            max_segment_phonemes=backend.max_phonemes,
            max_buffer_ms=self._config.max_buffer_ms,
            stall_timeout_s=self._config.stall_timeout_s,
            idle_cut_ms=self._config.idle_cut_ms,
            idle_timeout_s=self._config.idle_timeout_s,
        )
        self._control(
            Ready(
                session_id=self.session_id,
                model=model,
                voice=voice,
                speed=start.speed,
                encoding=start.encoding,
                sample_rate_hz=start.sample_rate_hz,
                frame_ms=start.frame_ms,
                pace=start.pace,
                lead_ms=start.lead_ms,
                alignment=start.alignment,
                limits=limits,
            )
        )
        if start.ignored_fields:
            self._control(WarningEvent("unknown_fields", f"ignored: {', '.join(start.ignored_fields)}"))
        self._arm_inactivity_timer()

    def _on_message(self, message: ClientMessage) -> None:
        if isinstance(message, Phonemes):
            self._on_phonemes(message.text)
        elif isinstance(message, Flush):
            if self._tickets_full():
                return
            self._cut(force=True)
            assert self._segmenter is not None
            self._segmenter.end_turn()
            self._add(FlushTicket(message.id))
        elif isinstance(message, Clear):
            self._clear()
        elif isinstance(message, Close):
            self._cut(force=True)
            self._add(CloseTicket(None))
            self.state = State.CLOSING
        else:
            self._reject(ProtocolError(ErrorCode.ALREADY_STARTED, "the session has started already"))

    def _on_phonemes(self, text: str) -> None:
        assert self._backend is not None
        assert self._segmenter is not None
        unknown = [c for c in self._backend.unknown_symbols(text) if not c.isspace()]
        if unknown:
            shown = " ".join(f"U+{ord(c):04X}({c})" for c in unknown[:16])
            self._reject(
                ProtocolError(
                    ErrorCode.UNKNOWN_SYMBOLS,
                    f"symbols outside the model's vocabulary: {shown}; the message was rejected",
                    symbols=tuple(unknown[:64]),
                )
            )
            return
        if self._segmenter.word_too_long(text):
            limit = self._backend.max_phonemes
            self._reject(ProtocolError(ErrorCode.WORD_TOO_LONG, f"a word (no whitespace) over {limit} phonemes"))
            return
        pending = self._segmenter.pending_phonemes + self._pending_in_playout()
        if pending + len(text) > self._config.max_pending_phonemes:
            limit = self._config.max_pending_phonemes
            self._reject(ProtocolError(ErrorCode.INPUT_OVERFLOW, f"over {limit} phonemes would be pending"))
            return
        # forced: the idle timer may cut what this message leaves pending
        if self._playout_len() + self._segmenter.count_cuts(text, force=True) > self._config.max_pending_tickets:
            limit = self._config.max_pending_tickets
            self._reject(ProtocolError(ErrorCode.INPUT_OVERFLOW, f"over {limit} segments and flushes would be pending"))
            return
        if self._ttfa_since is None and not self._playout_len() and not self._outbox.has_audio():
            self._ttfa_since = time.monotonic()
        turn_begins = not self._segmenter.turn_open and not self._segmenter.pending.strip()
        self._segmenter.append(text)
        self._cut(force=False)
        self._cancel_timer("idle")
        if self._segmenter.pending.strip():
            delay_s = self._config.idle_cut_ms / 1000.0
            self._timers["idle"] = asyncio.get_running_loop().call_later(delay_s, self._on_idle)
        if turn_begins and not self._segmenter.turn_open and self._segmenter.pending.strip():
            self._backend.prime()  # the turn's first words, not yet a segment: the model may warm up meanwhile

    def _playout_len(self) -> int:
        return 0 if self._playout is None else len(self._playout)

    def _pending_in_playout(self) -> int:
        return 0 if self._playout is None else self._playout.pending_phonemes

    def _add(self, ticket: SegmentTicket | FlushTicket | CloseTicket) -> None:
        assert self._playout is not None
        self._playout.add(ticket)
        self._pump()

    def _tickets_full(self) -> bool:
        """Whether a flush (a forced cut and its own ticket) would take the tickets over the limit; if so, the
        message is rejected here."""
        assert self._segmenter is not None
        if self._playout_len() + self._segmenter.count_cuts("", force=True) < self._config.max_pending_tickets:
            return False
        limit = self._config.max_pending_tickets
        self._reject(ProtocolError(ErrorCode.INPUT_OVERFLOW, f"over {limit} segments and flushes pending"))
        return True

    def _cut(self, *, force: bool) -> None:
        assert self._segmenter is not None
        assert self._backend is not None
        assert self._start is not None
        if force:
            self._cancel_timer("idle")
        for segment in self._segmenter.cut(force=force):
            phonemes = " ".join(segment.text.split())  # whitespace runs reach the model as one space
            if not phonemes:
                continue
            lead, trail = segment.pause_caps(self._config.join_pause_frames)
            job = SegmentJob(
                session_id=self.session_id,
                seq=self._next_seq,
                phonemes=phonemes,
                voice=self._voice,
                speed=self._start.speed,
                first_in_turn=segment.first_in_turn,
                submitted_at=time.monotonic(),
                max_lead_frames=lead,
                max_trail_frames=trail,
                first_chunk_frames=self._config.first_chunk_frames if segment.first_in_turn else None,
            )
            self._next_seq += 1
            assert self._playout is not None
            self._playout.add(SegmentTicket(job.seq, phonemes))
            self._backend.submit(job)

    def _on_idle(self) -> None:
        self._timers.pop("idle", None)
        if self.state is State.STREAMING:
            self._cut(force=True)

    def _arm_inactivity_timer(self) -> None:
        """(Re)start the idle timeout: `idle_timeout_s` without a client message and with nothing to send."""
        self._cancel_timer("inactive")
        if self._config.idle_timeout_s > 0 and self.state is State.STREAMING:
            delay_s = self._config.idle_timeout_s
            self._timers["inactive"] = asyncio.get_running_loop().call_later(delay_s, self._on_inactive)

    def _on_inactive(self) -> None:
        self._timers.pop("inactive", None)
        if self.state is not State.STREAMING:
            return
        if self._playout_len() or len(self._outbox):
            self._arm_inactivity_timer()  # still working for the client: not idle
            return
        self.fail(ErrorCode.IDLE_TIMEOUT, f"no message for {self._config.idle_timeout_s:g} s")

    def _on_start_timeout(self) -> None:
        self._timers.pop("start", None)
        if self.state is State.AWAITING_START:
            self.fail(ErrorCode.START_TIMEOUT, f"no `start` within {self._config.start_timeout_s} s")

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _clear(self) -> None:
        assert self._segmenter is not None
        assert self._backend is not None
        self._segmenter.reset()
        self._cancel_timer("idle")
        self._drop_pending()
        self._pacer.reset()
        self._ttfa_since = None
        self._control(Cleared())

    def _drop_pending(self) -> None:
        """Forget input, queued work and unsent audio; later outcomes of earlier segments are discarded."""
        if self._playout is not None:
            in_flight = None if self._writer is None else self._writer.in_flight
            self._playout.drop(in_flight.num_samples if isinstance(in_flight, AudioFrame) else 0)
        else:
            self._outbox.clear_ordered()
        self._first_live_seq = self._next_seq
        if self._backend is not None:
            self._backend.abort(self.session_id)
        self._report(force=True)

    # -- engine outcomes and the output pump --------------------------------------------------------------

    def _on_outcome(self, outcome: Delivery) -> None:
        try:
            self._take_outcome(outcome)
        except Exception:  # a bug here must not leave the client waiting for audio that will never come
            self._log.exception("session %s: an outcome could not be taken", self.session_id)
            self.fail(ErrorCode.INTERNAL, "internal server error")

    def _take_outcome(self, outcome: Delivery) -> None:
        if isinstance(outcome, EngineFailed):
            if self.state is not State.ENDED and not self._engine_failed:
                self._engine_failed = True
                self._log.error("session %s: its model's engine stopped", self.session_id)
                self.fail(ErrorCode.INTERNAL, "internal server error")
            return
        if isinstance(outcome, SegmentAudio):
            self._received_ms += outcome.duration_ms
        if self.state is State.ENDED:
            return
        if outcome.seq < self._first_live_seq or self._playout is None or not self._playout.resolve(outcome):
            self._report(force=True)  # stale: its audio counts as consumed at once
            return
        self._pump()

    def _pump(self) -> None:
        if self._playout is None or self.state is State.ENDED:
            return
        for failure in self._playout.pump():
            self._observer.on_error(failure.code)
            self._control(failure)
        self._wake.set()

    def _control(self, event: ServerEvent) -> None:
        if not self._outbox.push_control(TextEvent(encode_event(event))):
            self.fail(ErrorCode.STALLED, f"over {self._config.max_control_events} events unread")
            return
        self._wake.set()

    def unsent_ms(self) -> float:
        """Audio received from the engine and not yet sent."""
        return 0.0 if self._playout is None else self._playout.unsent_ms()

    def _report(self, *, force: bool) -> None:
        if self._backend is None:
            return
        consumed_ms = max(self._reported_ms, self._received_ms - self.unsent_ms())
        step_done = consumed_ms - self._reported_ms >= self._config.report_step_ms or not self._outbox.has_audio()
        if force or (step_done and consumed_ms != self._reported_ms):
            self._reported_ms = consumed_ms
            self._backend.report_consumed(self.session_id, consumed_ms)

    # -- writing -----------------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        writer = self._writer = Writer(
            self._transport,
            self._outbox,
            self._wake,
            stall_timeout_s=self._config.stall_timeout_s,
            pacer=lambda: self._pacer,
            on_audio_sent=self._after_audio_sent,
            on_taken=self._on_taken,
        )
        exit_reason = await writer.run()
        if exit_reason is WriterExit.STALLED:
            # the client stopped reading: give up on it (a close frame could not get through either)
            self._log.info("session %s: client stopped reading, closing", self.session_id)
            self._observer.on_error(ErrorCode.STALLED)
        self._end(exit_reason.value)

    def _on_taken(self, item: OutItem) -> None:
        """The writer took an item from the outbox: room for input, and for events waiting as tickets (audio
        is pumped once its frame has been sent, `_after_audio_sent`, so framed audio stays within its bound)."""
        self._room.set()
        if not isinstance(item, AudioFrame) and self._playout is not None and self._playout.tickets:
            self._pump()

    def _after_audio_sent(self, frame: AudioFrame, now: float) -> None:
        if self._playout is not None:
            self._playout.on_sent(frame)
        if self._ttfa_since is not None:
            self._observer.on_first_audio(now - self._ttfa_since)
            self._ttfa_since = None
        self._pump()
        self._report(force=False)

    # -- introspection -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Plain numbers for /debug/state and metrics."""
        return {
            "state": self.state.value,
            "buffered_ms": round(self._outbox.audio_ms, 3),
            "unsent_ms": round(self.unsent_ms(), 3),
            "pending_phonemes": (self._segmenter.pending_phonemes if self._segmenter else 0)
            + self._pending_in_playout(),
            "tickets": self._playout_len(),
            "outbox_items": len(self._outbox),
            "received_ms": round(self._received_ms, 3),
        }

    @property
    def buffered_ms(self) -> float:
        return self._outbox.audio_ms
