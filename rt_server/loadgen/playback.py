"""A simulated listener's playback: a virtual playout clock that counts underruns. Pure: time comes in as `now`.

Playback starts when a turn's first frame arrives and plays frames back to back in real time. A frame that
arrives after everything before it has played out means the listener heard silence in the middle of the turn:
one underrun, lasting from the moment the audio ran out to the frame's arrival. Silence before a turn's first
frame and after its last (between turns) is not an underrun; `end_turn` marks that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlayoutClock:
    """`tolerance_s`: gaps up to this long are not counted (a real player's output buffer hides them)."""

    tolerance_s: float = 0.0
    underruns: int = 0
    underrun_s: float = 0.0
    audio_s: float = 0.0  # all audio received, every turn
    first_frame_at: float | None = None  # the current turn's first frame
    _playout_end: float | None = None  # when the current turn's audio received so far has played out

    def on_frame(self, now: float, duration_s: float) -> float:
        """A frame of `duration_s` arrived at `now` (frames arrive in order; `now` never goes back). Returns
        when it starts to play."""
        if duration_s < 0:
            raise ValueError("a frame cannot be shorter than nothing")
        if self._playout_end is None:
            self.first_frame_at = now
            start = now
        elif now > self._playout_end:
            gap = now - self._playout_end
            if gap > self.tolerance_s:
                self.underruns += 1
                self.underrun_s += gap
            start = now
        else:
            start = self._playout_end
        self._playout_end = start + duration_s
        self.audio_s += duration_s
        return start

    def buffered_s(self, now: float) -> float:
        """Audio received and not yet played at `now`."""
        return 0.0 if self._playout_end is None else max(0.0, self._playout_end - now)

    @property
    def playout_end(self) -> float | None:
        """When the current turn's audio received so far will have played out (None before its first frame)."""
        return self._playout_end

    def end_turn(self) -> None:
        """The turn's last frame has arrived: the next frame starts a new turn, after a silence that is no
        underrun."""
        self._playout_end = None
        self.first_frame_at = None
