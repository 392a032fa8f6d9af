"""Water-mark hysteresis and real-time pacing (pure, time passed in)."""

from __future__ import annotations

import pytest

from rt_server.pipeline.flow import Pacer, WaterMarks


def test_water_marks_hysteresis() -> None:
    marks = WaterMarks(high_ms=100, low_ms=50)
    assert [marks.update(v) for v in (0, 99, 100, 70, 51, 50, 80, 100)] == [
        False,
        False,
        True,
        True,
        True,
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="low_ms"):
        WaterMarks(high_ms=10, low_ms=20)


def test_disabled_pacer_never_waits() -> None:
    pacer = Pacer(lead_ms=0, enabled=False)
    for _i in range(100):
        assert pacer.delay_s(0.0, 20) == 0.0
        pacer.on_sent(0.0, 20)
    assert pacer.ahead_ms(0.0) == pytest.approx(2000)


def test_realtime_pacer_keeps_at_most_lead_ms_ahead() -> None:
    pacer = Pacer(lead_ms=100, enabled=True)
    now = 0.0
    sent_ms = 0.0
    for _ in range(500):
        delay = pacer.delay_s(now, 20)
        now += delay
        pacer.on_sent(now, 20)
        sent_ms += 20
        assert pacer.ahead_ms(now) <= 100 + 1e-6
        # released no more than lead_ms ahead of real time
        assert sent_ms - now * 1000 <= 100 + 1e-6
    assert now == pytest.approx((sent_ms - 100) / 1000)


def test_lead_shorter_than_a_frame_still_progresses() -> None:
    pacer = Pacer(lead_ms=5, enabled=True)
    assert pacer.delay_s(0.0, 20) == 0.0
    pacer.on_sent(0.0, 20)
    assert pacer.delay_s(0.0, 20) == pytest.approx(0.035)
    assert pacer.delay_s(0.02, 20) == 0.0


def test_underrun_restarts_the_clock_and_reset_forgets() -> None:
    pacer = Pacer(lead_ms=40, enabled=True)
    pacer.on_sent(0.0, 40)
    assert pacer.delay_s(10.0, 40) == 0.0  # the client ran dry long ago
    pacer.on_sent(10.0, 40)
    assert pacer.ahead_ms(10.0) == pytest.approx(40)
    pacer.reset()
    assert pacer.ahead_ms(10.0) == 0.0
