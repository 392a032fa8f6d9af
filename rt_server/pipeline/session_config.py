"""The limits and tunables a session runs with (built from `Settings` by the app)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SessionConfig:
    max_message_bytes: int = 65_536
    max_pending_phonemes: int = 4096  # buffered input plus segments not yet synthesised
    max_buffer_ms: int = 2000  # framed audio waiting for the socket
    stall_timeout_s: float = 10.0  # a send blocked this long means the client stopped reading
    start_timeout_s: float = 10.0
    idle_timeout_s: float = 0.0  # a started session with no message and nothing to send is closed; 0: never
    idle_cut_ms: int = 500  # text after the last cut is synthesised after this long without input
    first_segment_min_phonemes: int = 12
    short_first_segment: bool = True  # off: the first segment of a turn is cut like the others
    clause_min_phonemes: int = 100
    # Frames of boundary silence kept before a turn's first word and on both sides of a mid-sentence cut;
    # None: the model's own pauses (about 0.4 s before and 0.3 s after every segment).
    join_pause_frames: int | None = 2
    # A turn's first segment is delivered in two parts, the first at least this many frames; None: whole
    first_chunk_frames: int | None = 10
    max_pending_tickets: int = 256  # segments and flushes waiting for output
    max_control_events: int = 64  # unread control events before the client counts as stalled
    # Input is not read while this many control events wait for the client (each message adds at most a few,
    # so the control queue stays below `max_control_events`); also the most events the ordered stream holds
    # (later ones wait as tickets, bounded by `max_pending_tickets`).
    max_queued_events: int = 32
    report_step_ms: float = 100.0  # consumed-audio reports to the scheduler, at least this far apart
