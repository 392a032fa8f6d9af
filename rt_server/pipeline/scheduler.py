"""The cross-session scheduler of one model: plans batches from the ready segments of all sessions. Pure.

Inputs and outputs are plain dataclasses and time comes in as `now` (seconds, any monotonic origin). The
engine thread owns one scheduler per model and calls it between model steps, so aborts take effect between
steps.

Policy:
- A session's segments run in order: only the head of each session's queue is a candidate, one per batch.
- Priority by playback deadline: a turn's first segment first (its listener hears nothing yet), then the
  sessions whose audio runs out soonest, then arrival order. Except, with `protect_playing`: a session whose
  listener is hearing a turn goes before a new turn's first segment when running that first segment ahead
  would leave the listener without audio, as estimated from the measured cost of past steps
  (`observe_step`): a gap in speech already playing is worse than a later start. A first segment is deferred so
  for at most `protect_max_defer_ms` after it arrived; then it goes first again, so that overload cannot hold
  a new turn back until the playing ones end.
- A bounded batch, by length bucketing (`pipeline.bucketing`): at most `max_batch_size` segments, at most
  `max_batch_tokens` padded cost (batch size times the longest item's tokens / speed, the cost of a padded
  batched forward) and at most `max_padding_waste` of it padding. The first candidate always runs.
- A bounded wait for more work (`max_wait_ms`), only when it pays: the batch is not full and no candidate is
  urgent (a first segment, or a session whose audio runs out within `urgent_within_ms`).
- Backpressure: a session whose unsent audio reaches `high_water_ms` is not planned again until it drains to
  `low_water_ms`. Unsent audio is what the scheduler produced minus what the session reported as consumed
  (sent, or discarded by `clear`), so it also counts results still on their way to the session.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from rt_server.pipeline.bucketing import BucketLimits, choose_batch
from rt_server.pipeline.flow import WaterMarks
from rt_server.pipeline.jobs import SegmentJob

# Segments per step when the setting leaves it to the device: on a CPU one pass already keeps every core busy
# and a batch only adds padding (docs/performance.md); a GPU is mostly idle on one segment.
AUTO_BATCH_SIZE = {"cpu": 1, "cuda": 16}
# `protect_playing`: the weight of the newest step in the running estimate of seconds per unit of cost, and the
# margin added to the estimated time of the two segments before a playing listener would run out.
COST_SMOOTHING = 0.2
PROTECT_MARGIN_S = 0.1


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int | None = 8  # None: by device (`for_device`)
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    # Share of a padded batch that may be padding (rt_server.pipeline.bucketing): bounds wasted compute.
    max_padding_waste: float = 0.5
    urgent_within_ms: float = 500.0
    # A playing session's next segment goes before a new turn's first segment when the latter would make its
    # listener run out of audio (estimated from the cost of past steps).
    protect_playing: bool = True
    # ... but a first segment that has waited this long is not deferred again (0: no bound).
    protect_max_defer_ms: float = 3000.0
    high_water_ms: float = 2000.0
    low_water_ms: float = 1000.0
    # Bound on one session's queue; the session's own input bound keeps it far below this.
    max_queued_per_session: int = 1024

    def __post_init__(self) -> None:
        if (self.max_batch_size is not None and self.max_batch_size < 1) or self.max_batch_tokens < 1:
            raise ValueError("batch bounds must be positive")
        if self.max_wait_ms < 0 or not 0 <= self.low_water_ms <= self.high_water_ms:
            raise ValueError("need max_wait_ms >= 0 and 0 <= low_water_ms <= high_water_ms")
        if self.protect_max_defer_ms < 0:
            raise ValueError("protect_max_defer_ms must not be negative")

    def for_device(self, device_type: str) -> SchedulerConfig:
        """This config with `max_batch_size` decided for a model on `device_type` when it is left open."""
        if self.max_batch_size is not None:
            return self
        return dataclasses.replace(self, max_batch_size=AUTO_BATCH_SIZE.get(device_type, 1))


@dataclass(frozen=True)
class Batch:
    jobs: tuple[SegmentJob, ...]
    protected: int = 0  # of them, segments run ahead of a waiting first segment (`protect_playing`)


@dataclass(frozen=True)
class Wait:
    until: float


@dataclass(frozen=True)
class Idle:
    pass


Plan = Batch | Wait | Idle


class SchedulerQueueFullError(Exception):
    """More than `max_queued_per_session` segments from one session (a bug: sessions bound their input)."""


@dataclass
class _SessionState:
    marks: WaterMarks
    queue: deque[SegmentJob] = field(default_factory=deque)  # bound: max_queued_per_session
    produced_ms: float = 0.0
    consumed_ms: float = 0.0
    turn_anchor_s: float | None = None  # when the current turn's first audio was produced
    turn_audio_ms: float = 0.0

    @property
    def unsent_ms(self) -> float:
        return max(0.0, self.produced_ms - self.consumed_ms)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        if config.max_batch_size is None:
            raise ValueError("max_batch_size must be decided (SchedulerConfig.for_device) before scheduling")
        self.config = config
        self._max_batch_size = config.max_batch_size
        self._sessions: dict[str, _SessionState] = {}
        self._seconds_per_cost: float | None = None  # running estimate from `observe_step`; None: no step yet

    # -- commands --------------------------------------------------------------------------------------

    def open_session(self, session_id: str) -> None:
        self._sessions.setdefault(
            session_id, _SessionState(WaterMarks(self.config.high_water_ms, self.config.low_water_ms))
        )

    def close_session(self, session_id: str) -> int:
        """Forget a session; returns how many queued segments were dropped."""
        state = self._sessions.pop(session_id, None)
        return 0 if state is None else len(state.queue)

    def submit(self, job: SegmentJob) -> None:
        state = self._sessions.get(job.session_id)
        if state is None:
            return  # the session closed while the job was on its way
        if len(state.queue) >= self.config.max_queued_per_session:
            raise SchedulerQueueFullError(f"session {job.session_id} has {len(state.queue)} queued segments")
        state.queue.append(job)

    def abort(self, session_id: str) -> int:
        """Drop a session's queued segments (its `clear`); returns how many. Running ones finish, and the
        session discards their audio.
        """
        state = self._sessions.get(session_id)
        if state is None:
            return 0
        dropped = len(state.queue)
        state.queue.clear()
        state.turn_anchor_s = None
        state.turn_audio_ms = 0.0
        return dropped

    def report_consumed(self, session_id: str, consumed_ms: float) -> None:
        """The session's running total of audio sent or discarded (monotonic; stale reports are harmless)."""
        state = self._sessions.get(session_id)
        if state is not None:
            state.consumed_ms = max(state.consumed_ms, consumed_ms)

    def complete(self, job: SegmentJob, audio_ms: float, now: float, playing_since: float | None = None) -> None:
        """A planned segment produced `audio_ms` of audio (0 for a failed segment). `playing_since`: when its
        opening went out ahead of the rest (the listener's clock started then, not at `now`)."""
        state = self._sessions.get(job.session_id)
        if state is None:
            return
        state.produced_ms += audio_ms
        start = now if playing_since is None else playing_since
        if job.first_in_turn or state.turn_anchor_s is None or _runs_out_at(state) < start:
            # A new turn, or audio that comes after the listener ran out (a client that paused without
            # `flush`, or a step that came late): the listener's clock starts again with this audio.
            state.turn_anchor_s = start
            state.turn_audio_ms = audio_ms
        else:
            state.turn_audio_ms += audio_ms

    def observe_step(self, jobs: Sequence[SegmentJob], compute_s: float) -> None:
        """A model step ran `jobs` in `compute_s` seconds: updates the estimate of seconds per unit of cost
        (a job's `tokens / speed`) that `protect_playing` uses."""
        cost = sum(_cost(job) for job in jobs)
        if cost <= 0 or not compute_s >= 0:
            return
        rate = compute_s / cost
        previous = self._seconds_per_cost
        self._seconds_per_cost = rate if previous is None else previous + COST_SMOOTHING * (rate - previous)

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return sum(len(s.queue) for s in self._sessions.values())

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def seconds_per_cost(self) -> float | None:
        """The running estimate of a step's seconds per unit of cost; None before any step was observed."""
        return self._seconds_per_cost

    def unsent_ms(self, session_id: str) -> float:
        state = self._sessions.get(session_id)
        return 0.0 if state is None else state.unsent_ms

    def is_paused(self, session_id: str) -> bool:
        state = self._sessions.get(session_id)
        return state is not None and state.marks.paused

    def others_waiting(self, session_ids: set[str]) -> bool:
        """Whether a session outside `session_ids` has a segment waiting that the scheduler would plan (it is
        not held back by its high-water mark)."""
        return any(
            state.queue and not state.marks.paused
            for session_id, state in self._sessions.items()
            if session_id not in session_ids
        )

    def deadline(self, session_id: str, job: SegmentJob) -> float:
        """When the session's listener runs out of audio, as far as the scheduler knows."""
        state = self._sessions[session_id]
        if job.first_in_turn or state.turn_anchor_s is None or _ran_dry_before(state, job):
            return job.submitted_at  # the listener has been waiting since it came, as for a new turn
        return _runs_out_at(state)

    # -- planning --------------------------------------------------------------------------------------

    def plan(self, now: float) -> Plan:
        """The next step: a batch to run now (its jobs leave the queues), a time to wait until, or idle."""
        heads: list[SegmentJob] = []
        for state in self._sessions.values():
            paused = state.marks.update(state.unsent_ms)
            if not paused and state.queue:
                heads.append(state.queue[0])
        if not heads:
            return Idle()
        firsts = [job for job in heads if job.first_in_turn]
        # The first segment that would run next: the one waiting longest. Deferred long enough, it goes first.
        next_first = min(firsts, key=lambda job: job.submitted_at) if firsts else None
        bound_s = self.config.protect_max_defer_ms / 1000.0
        if next_first is not None and bound_s > 0 and now - next_first.submitted_at >= bound_s:
            next_first = None
        candidates: list[tuple[tuple[int, float, float], SegmentJob]] = []
        for job in heads:
            deadline = self.deadline(job.session_id, job)
            if job.first_in_turn:
                rank = 1
            elif next_first is not None and self._would_run_dry(job, deadline, next_first, now):
                rank = 0
            else:
                rank = 2
            candidates.append(((rank, deadline, job.submitted_at), job))
        candidates.sort(key=lambda c: c[0])
        chosen = self._select([job for _, job in candidates])
        if not self._should_run_now(candidates, chosen, now):
            urgent_at = min(key[1] for key, _ in candidates) - self.config.urgent_within_ms / 1000.0
            oldest = min(job.submitted_at for _, job in candidates)
            until = min(oldest + self.config.max_wait_ms / 1000.0, urgent_at)
            if until > now:
                return Wait(until=until)
        for job in chosen:
            self._sessions[job.session_id].queue.popleft()
        protected = sum(1 for key, job in candidates if key[0] == 0 and job in chosen)
        return Batch(jobs=tuple(chosen), protected=protected)

    def _select(self, ordered: list[SegmentJob]) -> list[SegmentJob]:
        """Length bucketing over the candidates in priority order: the most urgent always runs, and others
        share its pass only while the padded batch stays within the token budget and the padding waste bound.
        The cost of an item is its frame count's proxy, tokens / speed (frames dominate the decoder)."""
        limits = BucketLimits(
            max_items=self._max_batch_size,
            max_padded_cost=float(self.config.max_batch_tokens),
            max_waste=self.config.max_padding_waste,
        )
        return [ordered[i] for i in choose_batch([_cost(job) for job in ordered], limits)]

    def _should_run_now(
        self, candidates: list[tuple[tuple[int, float, float], SegmentJob]], chosen: list[SegmentJob], now: float
    ) -> bool:
        if self.config.max_wait_ms == 0 or len(chosen) == self._max_batch_size:
            return True
        if len(chosen) < len(candidates):
            return True  # the budget is already full: more work would not join this batch
        urgent_s = self.config.urgent_within_ms / 1000.0
        return any(key[0] < 2 or key[1] - now <= urgent_s for key, _ in candidates)

    def _would_run_dry(self, job: SegmentJob, deadline: float, first: SegmentJob, now: float) -> bool:
        """Whether `job`'s listener, hearing its turn now, would run out of audio if `first` ran before it."""
        rate = self._seconds_per_cost
        state = self._sessions[job.session_id]
        if not self.config.protect_playing or rate is None or state.turn_anchor_s is None:
            return False
        if _ran_dry_before(state, job):
            return False  # its listener hears nothing now: not a playing session
        return deadline - now < rate * (_cost(job) + _cost(first)) + PROTECT_MARGIN_S


def _runs_out_at(state: _SessionState) -> float:
    """When the session's listener has played all of its turn's audio (its turn has begun)."""
    assert state.turn_anchor_s is not None
    return state.turn_anchor_s + state.turn_audio_ms / 1000.0


def _ran_dry_before(state: _SessionState, job: SegmentJob) -> bool:
    """Whether the session's listener had played all of its turn's audio before `job` was submitted."""
    return state.turn_anchor_s is not None and _runs_out_at(state) < job.submitted_at


def _cost(job: SegmentJob) -> float:
    """What a job costs the model, in the unit `_select` budgets: tokens / speed."""
    return job.tokens / job.speed
