"""The cross-session scheduler: priorities, order, bounds, backpressure, bounded waiting (pure, `now` given)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt_server.pipeline.jobs import SegmentJob
from rt_server.pipeline.scheduler import Batch, Idle, Scheduler, SchedulerConfig, Wait


def _job(session: str, seq: int, n: int = 10, *, first: bool = False, at: float = 0.0) -> SegmentJob:
    return SegmentJob(session, seq, "a" * n, "af_test", 1.0, first, at)


def _scheduler(**overrides: float) -> Scheduler:
    # no waiting and no backpressure unless a test asks for them
    defaults = {"max_wait_ms": 0.0, "high_water_ms": 1e9, "low_water_ms": 1e9}
    config = SchedulerConfig(**{**defaults, **overrides})  # type: ignore[arg-type]
    return Scheduler(config)


def _batch(plan: object) -> list[tuple[str, int]]:
    assert isinstance(plan, Batch), plan
    return [(j.session_id, j.seq) for j in plan.jobs]


def test_idle_when_nothing_is_queued() -> None:
    sched = _scheduler()
    sched.open_session("a")
    assert isinstance(sched.plan(0.0), Idle)


def test_one_segment_per_session_per_batch_in_order() -> None:
    sched = _scheduler()
    sched.open_session("a")
    for seq in range(3):
        sched.submit(_job("a", seq))
    assert _batch(sched.plan(0.0)) == [("a", 0)]
    assert _batch(sched.plan(0.0)) == [("a", 1)]
    assert _batch(sched.plan(0.0)) == [("a", 2)]


def test_first_segment_of_a_turn_goes_first_then_earliest_deadline() -> None:
    sched = _scheduler(max_batch_size=1)
    for name in "abc":
        sched.open_session(name)
    # a and b are mid-turn; b's audio runs out sooner
    sched.submit(_job("a", 0, first=True))
    sched.submit(_job("b", 0, first=True))
    assert _batch(sched.plan(0.0)) == [("a", 0)]
    sched.complete(_job("a", 0, first=True), audio_ms=5000, now=1.0)  # a has 5 s of audio from t=1
    assert _batch(sched.plan(1.0)) == [("b", 0)]
    sched.complete(_job("b", 0, first=True), audio_ms=1000, now=1.0)  # b has 1 s
    sched.submit(_job("a", 1, at=1.5))
    sched.submit(_job("b", 1, at=1.6))
    sched.submit(_job("c", 0, first=True, at=1.7))
    assert _batch(sched.plan(1.8)) == [("c", 0)]  # a new turn first
    assert _batch(sched.plan(1.8)) == [("b", 1)]  # runs out at 2.0
    assert _batch(sched.plan(1.8)) == [("a", 1)]  # runs out at 6.0


def _a_playing(*, observed: bool = True, **overrides: object) -> Scheduler:
    """a hears 1 s of audio from t=1 (it runs out at 2.0) and has its next segment queued at 1.1: 22 units
    (20 phonemes + 2 boundary tokens); observed: a step of 0.01 s a unit (0.22 s for that segment)."""
    sched = _scheduler(**{"max_batch_size": 1, **overrides})  # type: ignore[arg-type]
    _a_hears_one_second(sched, observed=observed)
    sched.submit(_job("a", 1, 20, at=1.1))
    return sched


def _a_hears_one_second(sched: Scheduler, *, observed: bool = True) -> None:
    """a's turn begins: its first segment gives 1 s of audio at t=1 (it runs out at 2.0); observed: a step of
    0.01 s a unit."""
    sched.open_session("a")
    sched.submit(_job("a", 0, first=True))
    sched.plan(0.0)
    sched.complete(_job("a", 0, first=True), audio_ms=1000, now=1.0)
    if observed:
        sched.observe_step([_job("x", 0, 98)], compute_s=1.0)  # 100 units in 1 s


def _playing_and_new_turn(now: float, *, observed: bool = True, new_turn_at: float = 1.2, **overrides: object) -> Batch:
    """`_a_playing`, and c starts a turn at `new_turn_at` with a segment of the same cost."""
    sched = _a_playing(observed=observed, **overrides)
    sched.open_session("c")
    sched.submit(_job("c", 0, 20, first=True, at=new_turn_at))
    plan = sched.plan(now)
    assert isinstance(plan, Batch), plan
    return plan


def test_a_playing_session_goes_before_a_new_turn_that_would_leave_it_silent() -> None:
    # a needs 0.22 s after c's 0.22 s, plus the 0.1 s margin: 0.54 s; at 1.3 it has 0.7 s left, at 1.7 0.3 s
    early = _playing_and_new_turn(1.3)
    assert (_batch(early), early.protected) == ([("c", 0)], 0)
    late = _playing_and_new_turn(1.7)
    assert (_batch(late), late.protected) == ([("a", 1)], 1)
    assert _batch(_playing_and_new_turn(2.5, new_turn_at=2.0)) == [("a", 1)]  # already silent: its gap ends sooner
    # no estimate yet (no step observed), or the policy off: the new turn first, as before
    assert _batch(_playing_and_new_turn(1.7, observed=False)) == [("c", 0)]
    assert _batch(_playing_and_new_turn(1.7, protect_playing=False)) == [("c", 0)]
    # both in one batch where batches hold two: the playing one is still counted as protected
    both = _playing_and_new_turn(1.7, max_batch_size=2)
    assert (sorted(_batch(both)), both.protected) == ([("a", 1), ("c", 0)], 1)


def test_a_new_turn_is_deferred_for_at_most_protect_max_defer_ms() -> None:
    # c arrived at -1.25 and has waited 2.95 s at 1.7: still deferred; arrived at -1.3, it has waited the
    # default bound of 3 s: it goes first although a then runs dry
    assert _batch(_playing_and_new_turn(1.7, new_turn_at=-1.25)) == [("a", 1)]
    capped = _playing_and_new_turn(1.7, new_turn_at=-1.3)
    assert (_batch(capped), capped.protected) == ([("c", 0)], 0)
    assert _batch(_playing_and_new_turn(1.7, new_turn_at=0.3, protect_max_defer_ms=2000)) == [("a", 1)]
    assert _batch(_playing_and_new_turn(1.7, new_turn_at=0.3, protect_max_defer_ms=1400)) == [("c", 0)]
    assert _batch(_playing_and_new_turn(1.7, new_turn_at=-60.0, protect_max_defer_ms=0)) == [("a", 1)]  # no bound
    with pytest.raises(ValueError, match="protect_max_defer_ms"):
        SchedulerConfig(protect_max_defer_ms=-1)


def test_the_bound_is_taken_from_the_longest_waiting_new_turn() -> None:
    # a is playing and about to run dry (as above); d's turn has waited past the bound, c's has just arrived:
    # d goes first, and c then still waits behind a
    sched = _a_playing()
    sched.open_session("c")
    sched.open_session("d")
    sched.submit(_job("c", 0, 20, first=True, at=1.6))
    sched.submit(_job("d", 0, 20, first=True, at=-1.5))
    first, second = sched.plan(1.7), sched.plan(1.7)
    assert isinstance(first, Batch) and isinstance(second, Batch)
    assert (_batch(first), first.protected) == ([("d", 0)], 0)
    assert (_batch(second), second.protected) == ([("a", 1)], 1)
    assert _batch(sched.plan(1.7)) == [("c", 0)]


def test_the_cost_estimate_follows_the_observed_steps() -> None:
    sched = _a_playing()  # 0.01 s a unit
    for _ in range(40):
        sched.observe_step([_job("x", 0, 18), _job("y", 0, 18)], compute_s=0.2)  # 40 units: 0.005 s a unit
    sched.observe_step([], compute_s=1.0)  # nothing ran: ignored
    sched.observe_step([_job("x", 0, 18)], compute_s=float("nan"))  # ignored
    assert sched.seconds_per_cost == pytest.approx(0.005, rel=1e-3)
    sched.open_session("c")
    sched.submit(_job("c", 0, 20, first=True, at=1.2))
    # at 0.005 s a unit a needs 0.11 + 0.11 + 0.1 = 0.32 s: 0.4 s left is enough for c first (0.01: 0.54 s)
    assert _batch(sched.plan(1.6)) == [("c", 0)]


def test_batch_size_and_padded_token_budget() -> None:
    sched = _scheduler(max_batch_size=3, max_batch_tokens=600)
    for i in range(5):
        sched.open_session(f"s{i}")
        sched.submit(_job(f"s{i}", 0, n=98 if i != 1 else 400, at=i))
    # s0 (100 tokens), s1 (402: 2 x 402 > 600, skipped), s2, s3 (3 x 100)
    assert _batch(sched.plan(10.0)) == [("s0", 0), ("s2", 0), ("s3", 0)]
    assert _batch(sched.plan(10.0)) == [("s1", 0)]  # alone it always fits
    assert _batch(sched.plan(10.0)) == [("s4", 0)]


def test_backpressure_pauses_at_high_water_and_resumes_below_low_water() -> None:
    sched = _scheduler(high_water_ms=1000, low_water_ms=400)
    sched.open_session("a")
    for seq in range(4):
        sched.submit(_job("a", seq))
    job0 = sched.plan(0.0)
    assert _batch(job0) == [("a", 0)]
    sched.complete(_job("a", 0), audio_ms=1200, now=0.1)
    assert isinstance(sched.plan(0.1), Idle)  # 1200 ms unsent >= high water
    assert sched.is_paused("a")
    sched.report_consumed("a", 700)  # 500 unsent: still above low water
    assert isinstance(sched.plan(0.2), Idle)
    sched.report_consumed("a", 300)  # stale, lower report: ignored
    assert sched.unsent_ms("a") == 500
    sched.report_consumed("a", 800)  # 400 unsent: resume
    assert _batch(sched.plan(0.3)) == [("a", 1)]


def test_a_paused_session_does_not_hold_up_others() -> None:
    sched = _scheduler(high_water_ms=1000, low_water_ms=500, max_batch_size=4)
    sched.open_session("slow")
    sched.open_session("fast")
    sched.submit(_job("slow", 0))
    sched.plan(0.0)
    sched.complete(_job("slow", 0), audio_ms=3000, now=0.0)
    for seq in range(3):
        sched.submit(_job("slow", seq + 1))
        sched.submit(_job("fast", seq))
    for seq in range(3):
        assert _batch(sched.plan(1.0)) == [("fast", seq)]
        sched.complete(_job("fast", seq), audio_ms=100, now=1.0)
        sched.report_consumed("fast", 100 * (seq + 1))


def test_abort_drops_queued_work_and_close_forgets_the_session() -> None:
    sched = _scheduler()
    sched.open_session("a")
    sched.open_session("b")
    for seq in range(3):
        sched.submit(_job("a", seq))
    sched.submit(_job("b", 0))
    assert sched.abort("a") == 3
    assert _batch(sched.plan(0.0)) == [("b", 0)]
    sched.submit(_job("a", 3))
    assert sched.close_session("a") == 1
    assert isinstance(sched.plan(0.0), Idle)
    sched.submit(_job("a", 4))  # late submit for a closed session: ignored
    sched.complete(_job("a", 4), 100, 0.0)
    assert sched.queue_depth == 0


def test_waits_a_bounded_time_only_when_nothing_is_urgent() -> None:
    sched = _scheduler(max_wait_ms=10, urgent_within_ms=200, max_batch_size=4)
    sched.open_session("a")
    sched.open_session("b")
    # a new turn is urgent: no waiting
    sched.submit(_job("a", 0, first=True, at=0.0))
    assert _batch(sched.plan(0.0)) == [("a", 0)]
    sched.complete(_job("a", 0, first=True), audio_ms=5000, now=0.0)
    # a has 5 s of audio left: its next segment may wait up to 10 ms for company
    sched.submit(_job("a", 1, at=1.0))
    plan = sched.plan(1.0)
    assert isinstance(plan, Wait)
    assert plan.until == 1.0 + 0.010
    sched.submit(_job("b", 0, first=True, at=1.005))  # company arrives, and it is urgent
    assert sorted(_batch(sched.plan(1.005))) == [("a", 1), ("b", 0)]
    # once the wait is over, it runs alone
    sched.submit(_job("a", 2, at=2.0))
    assert isinstance(sched.plan(2.0), Wait)
    assert _batch(sched.plan(2.011)) == [("a", 2)]
    # close to running out: urgent, no wait (a's audio ends at 5.0)
    sched.submit(_job("a", 3, at=4.85))
    assert _batch(sched.plan(4.85)) == [("a", 3)]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(1, 510), st.booleans()), min_size=1, max_size=60),
    st.integers(1, 8),
    st.integers(512, 4096),
)
def test_never_exceeds_its_budget_and_keeps_each_session_in_order(
    jobs: list[tuple[int, int, bool]], max_batch_size: int, max_batch_tokens: int
) -> None:
    sched = _scheduler(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
    seqs: dict[str, int] = {}
    for i, (session, n, first) in enumerate(jobs):
        name = f"s{session}"
        sched.open_session(name)
        seqs[name] = seqs.get(name, -1) + 1
        sched.submit(_job(name, seqs[name], n=n, first=first, at=i * 0.01))
    done: dict[str, list[int]] = {}
    while not isinstance(plan := sched.plan(100.0), Idle):
        assert isinstance(plan, Batch)
        batch = plan.jobs
        assert 1 <= len(batch) <= max_batch_size
        assert len(batch) == 1 or len(batch) * max(j.tokens for j in batch) <= max_batch_tokens
        assert len({j.session_id for j in batch}) == len(batch)
        for job in batch:
            done.setdefault(job.session_id, []).append(job.seq)
            sched.complete(job, 0.0, 100.0)
    for name, order in done.items():
        assert order == list(range(seqs[name] + 1))
    assert sum(len(v) for v in done.values()) == len(jobs)


def test_padding_waste_is_bounded_by_length_bucketing() -> None:
    sched = _scheduler(max_padding_waste=0.3)
    for name in "abc":
        sched.open_session(name)
    sched.submit(_job("a", 0, 198, first=True))  # 200 tokens with the boundaries
    sched.submit(_job("b", 0, 18, first=True))  # 20 tokens: 45 % of a shared pass would be padding
    sched.submit(_job("c", 0, 178, first=True))  # 180 tokens: 5 % padding
    assert _batch(sched.plan(0.0)) == [("a", 0), ("c", 0)]
    assert _batch(sched.plan(0.0)) == [("b", 0)]  # the short one runs next, not padded to 200


def test_batch_size_left_open_is_decided_by_the_device() -> None:
    from rt_server.pipeline.scheduler import AUTO_BATCH_SIZE

    open_config = SchedulerConfig(max_batch_size=None)
    assert open_config.for_device("cpu").max_batch_size == AUTO_BATCH_SIZE["cpu"] == 1
    assert open_config.for_device("cuda").max_batch_size == AUTO_BATCH_SIZE["cuda"] == 16
    assert SchedulerConfig(max_batch_size=4).for_device("cpu").max_batch_size == 4  # a set value stays
    with pytest.raises(ValueError, match="decided"):
        Scheduler(open_config)


def test_others_waiting_counts_sessions_the_scheduler_would_plan() -> None:
    sched = _scheduler(high_water_ms=1000, low_water_ms=500)
    for name in ("a", "b", "full"):
        sched.open_session(name)
    sched.submit(_job("a", 0, first=True))
    assert not sched.others_waiting({"a"})  # only a's own work
    sched.submit(_job("full", 0))
    assert _batch(sched.plan(0.0)) == [("a", 0), ("full", 0)]
    sched.complete(_job("full", 0), audio_ms=3000, now=0.0)  # 3 s of full's audio not yet sent
    sched.submit(_job("full", 1))
    assert isinstance(sched.plan(0.0), Idle)  # full is over its high-water mark: held back
    assert not sched.others_waiting({"a"})  # full waits, but the scheduler holds it back anyway
    sched.submit(_job("b", 0))
    assert sched.others_waiting({"a"}) and not sched.others_waiting({"a", "b"})


def test_an_opening_sent_ahead_starts_the_listeners_clock() -> None:
    """A first segment whose opening went out before the step ended: its listener started playing then, so the
    turn's next deadline counts from then, not from the step's end."""
    sched = _scheduler()
    sched.open_session("a")
    sched.submit(_job("a", 0, first=True))
    sched.plan(0.0)
    sched.complete(_job("a", 0, first=True), audio_ms=1000, now=0.5, playing_since=0.2)
    sched.submit(_job("a", 1))
    assert sched.deadline("a", _job("a", 1)) == pytest.approx(1.2)  # 0.2 s + 1 s of audio, not 1.5 s
    sched.complete(_job("a", 1), audio_ms=500, now=0.9)
    assert sched.deadline("a", _job("a", 2)) == pytest.approx(1.7)


def test_a_turn_resumed_after_its_listener_ran_dry_starts_a_new_clock() -> None:
    # a heard 1 s of audio from t=1 and had nothing more until t=30 (a client that paused without `flush`):
    # its listener has been waiting since 30, not since 2, so its segment neither counts as protected nor
    # keeps a deadline 28 s in the past (which would put it before every playing session for 28 s of audio)
    sched = _scheduler(max_batch_size=1)
    _a_hears_one_second(sched)
    for name in "cd":
        sched.open_session(name)
    sched.submit(_job("c", 0, 20, first=True, at=29.0))
    sched.plan(29.0)
    sched.complete(_job("c", 0, 20, first=True), audio_ms=2000, now=29.0)  # c runs out at 31.0
    resumed = _job("a", 1, 20, at=30.0)
    sched.submit(resumed)
    sched.submit(_job("c", 1, 20, at=30.1))
    sched.submit(_job("d", 0, 20, first=True, at=30.2))
    assert sched.deadline("a", resumed) == 30.0
    new_turn = sched.plan(30.3)
    assert (_batch(new_turn), new_turn.protected) == ([("d", 0)], 0)  # a is not a playing session
    assert _batch(sched.plan(30.5)) == [("a", 1)]  # waiting since 30.0, before c runs out at 31.0
    sched.complete(resumed, audio_ms=3000, now=30.6)  # its listener's clock starts again here
    following = _job("a", 2, 20, at=30.7)
    sched.submit(following)
    assert sched.deadline("a", following) == pytest.approx(33.6)
    assert _batch(sched.plan(30.8)) == [("c", 1)]  # c runs out at 31.0, a at 33.6


def test_audio_that_comes_after_the_listener_ran_out_restarts_its_clock() -> None:
    # a's first second ran out at 2.0; its next segment, submitted at 1.9, came late, at 5.0: the listener
    # hears it from 5.0 to 6.0, so a's next one, submitted at 4.0 while a was silent, is due at 6.0 and still
    # protected against a new turn that would leave a silent again
    sched = _scheduler(max_batch_size=1)
    _a_hears_one_second(sched)
    sched.open_session("d")
    late = _job("a", 1, 20, at=1.9)
    sched.submit(late)
    sched.plan(1.9)
    sched.complete(late, audio_ms=1000, now=5.0)
    queued = _job("a", 2, 58, at=4.0)  # 60 units: 0.6 s
    sched.submit(queued)
    sched.submit(_job("d", 0, 58, first=True, at=4.5))
    assert sched.deadline("a", queued) == pytest.approx(6.0)
    plan = sched.plan(5.0)
    assert (_batch(plan), plan.protected) == ([("a", 2)], 1)
