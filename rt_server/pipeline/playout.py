"""A session's output side, pure: tickets in submission order, through the output chain, into the outbox.

Segment outcomes fill their tickets; `pump` moves ready audio (resample, encode, frame) into the outbox while the
outbox holds less than `max_buffer_ms`, so framed audio waiting for the socket stays within that bound (plus
one frame), and the rest of a synthesised segment waits unframed in its ticket. Flush and close markers between
segments end the stream (the resampler's tail, the shorter last frame) and emit `flushed` / `done` in order.
"""

from __future__ import annotations

from rt_server.pipeline.audio_out import AudioOutput
from rt_server.pipeline.jobs import SegmentOutcome
from rt_server.pipeline.outbox import AudioFrame, CloseFrame, Outbox, TextEvent
from rt_server.pipeline.tickets import CloseTicket, FlushTicket, SegmentTicket, Ticket, Tickets
from rt_server.protocol import (
    CloseCode,
    Done,
    ErrorCode,
    ErrorEvent,
    Flushed,
    ServerEvent,
    close_code_for,
    close_reason_for,
    encode_event,
)


class Playout:
    def __init__(
        self, outbox: Outbox, audio: AudioOutput, *, max_buffer_ms: float, alignment: bool, max_events: int
    ) -> None:
        self.outbox = outbox
        self.audio = audio
        self.max_buffer_ms = max_buffer_ms
        self.max_events = max_events  # events in the outbox's ordered stream; later ones wait as tickets
        self.alignment = alignment
        self.tickets = Tickets()
        self.sent_samples = 0  # output samples the client has been sent

    def add(self, ticket: Ticket) -> None:
        self.tickets.append(ticket)

    def resolve(self, outcome: SegmentOutcome) -> bool:
        """Attach an outcome to its ticket; False when there is none (the segment was cleared)."""
        return self.tickets.resolve(outcome)

    def pump(self) -> list[ErrorEvent]:
        """Move ready output into the outbox, in order, while it has room. Returns the failed segments' errors
        (control events, for the caller to send ahead of the audio)."""
        failures: list[ErrorEvent] = []
        while (
            self.tickets and self.outbox.audio_ms < self.max_buffer_ms and self.outbox.ordered_events < self.max_events
        ):
            ticket = self.tickets.head()
            if isinstance(ticket, SegmentTicket):
                if ticket.failed is not None:
                    self.tickets.pop()
                    failures.append(ErrorEvent(ErrorCode.SYNTHESIS_FAILED, f"segment {ticket.seq}: {ticket.failed}"))
                    continue
                if ticket.remaining_samples == 0 and not ticket.complete:
                    break  # (the rest) still being synthesised
                self._frame_segment(ticket)
            else:
                self.tickets.pop()
                self._end_stream()
                if isinstance(ticket, FlushTicket):
                    self._emit(Flushed(ticket.flush_id))
                else:
                    self._close(ticket)
                    break
        return failures

    def _frame_segment(self, ticket: SegmentTicket) -> None:
        if not ticket.announced:
            ticket.announced = True
            if self.alignment:
                self._emit(ticket.alignment(self.audio.samples_to_ms(self.audio.position_samples)))
        room_ms = self.max_buffer_ms - self.outbox.audio_ms
        for frame in self.audio.push(ticket.take(room_ms)):
            self.outbox.push(frame)
        if ticket.remaining_samples == 0 and ticket.complete:
            self.tickets.pop()

    def _end_stream(self) -> None:
        for frame in self.audio.end_stream():
            self.outbox.push(frame)

    def _close(self, ticket: CloseTicket) -> None:
        if ticket.error is None:
            self._emit(Done())
            self.outbox.push(CloseFrame(CloseCode.NORMAL, ""))
            return
        self._emit(ErrorEvent(ticket.error, "the server is shutting down"))
        code = close_code_for(ticket.error)
        assert code is not None
        self.outbox.push(CloseFrame(code, close_reason_for(ticket.error)))

    def _emit(self, event: ServerEvent) -> None:
        self.outbox.push(TextEvent(encode_event(event)))

    def on_sent(self, frame: AudioFrame) -> None:
        self.sent_samples += frame.num_samples

    def drop(self, in_flight_samples: int = 0) -> None:
        """Forget pending tickets and unsent audio (on `clear` or a fatal error); the timeline resumes at what
        was sent, the frame being sent now (`in_flight_samples`) included: it still reaches the client."""
        self.tickets.clear()
        self.outbox.clear_ordered()
        self.audio.reset(self.sent_samples + in_flight_samples)

    def unsent_ms(self) -> float:
        """Audio received and not yet sent: framed in the outbox, in the framer, or waiting in tickets."""
        return self.outbox.audio_ms + self.audio.pending_ms + self.tickets.unframed_ms

    @property
    def pending_phonemes(self) -> int:
        return self.tickets.pending_phonemes

    def __len__(self) -> int:
        return len(self.tickets)
