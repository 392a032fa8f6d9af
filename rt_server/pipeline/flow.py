"""Flow control: water-mark hysteresis and real-time pacing. Pure: time comes in as `now` (seconds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WaterMarks:
    """Hysteresis on a buffer level: `paused` turns on at `high_ms` and off again only at `low_ms`.

    Stops a producer at the high-water mark and restarts it below the low-water mark, so it does not flap on
    and off around a single threshold.
    """

    high_ms: float
    low_ms: float
    paused: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.low_ms <= self.high_ms:
            raise ValueError("need 0 <= low_ms <= high_ms")

    def update(self, level_ms: float) -> bool:
        """Feed the current level; returns whether the producer is paused now."""
        if self.paused and level_ms <= self.low_ms:
            self.paused = False
        elif not self.paused and level_ms >= self.high_ms:
            self.paused = True
        return self.paused


class Pacer:
    """Releases audio no more than `lead_ms` ahead of real time (`pace: realtime`); `enabled=False` never
    waits.

    It models the client's playback: audio sent plays from when it arrives, back to back, so the client's
    queue runs dry at `playout_end`. A frame may go when, after it, the client holds at most `lead_ms` (or
    when the client has nothing left, so a `lead_ms` shorter than a frame still makes progress).
    """

    def __init__(self, *, lead_ms: float, enabled: bool) -> None:
        self.lead_ms = lead_ms
        self.enabled = enabled
        self._playout_end_s: float | None = None

    def ahead_ms(self, now: float) -> float:
        """Audio the client holds at `now`, by this model."""
        if self._playout_end_s is None:
            return 0.0
        return max(0.0, (self._playout_end_s - now) * 1000.0)

    def delay_s(self, now: float, duration_ms: float) -> float:
        """Seconds to wait before a frame of `duration_ms` may be sent (0.0: send now)."""
        if not self.enabled:
            return 0.0
        ahead = self.ahead_ms(now)
        if ahead <= 0.0 or ahead + duration_ms <= self.lead_ms:
            return 0.0
        return max(0.0, ahead + duration_ms - self.lead_ms) / 1000.0

    def on_sent(self, now: float, duration_ms: float) -> None:
        start = now if self._playout_end_s is None else max(now, self._playout_end_s)
        self._playout_end_s = start + duration_ms / 1000.0

    def reset(self) -> None:
        """Forget the client's queue (after `clear` a client drops what it had buffered)."""
        self._playout_end_s = None
