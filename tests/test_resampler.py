"""The streaming resampler equals one resample_poly call over the whole stream, however it is chunked."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import resample_poly

from rt_server.pipeline.resampler import StreamingResampler


def _stream(resampler: StreamingResampler, x: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, i = [], 0
    for size in sizes:
        out.append(resampler.push(x[i : i + size]))
        i += size
    out.append(resampler.push(x[i:]))
    out.append(resampler.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
@settings(max_examples=25, deadline=None)
@given(length=st.integers(0, 3000), sizes=st.lists(st.integers(0, 700), max_size=8), seed=st.integers(0, 9))
def test_chunked_equals_one_shot(rate: int, length: int, sizes: list[int], seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(length).astype(np.float32)
    resampler = StreamingResampler(24000, rate)
    y = _stream(resampler, x, sizes)
    expected_len = -(-length * rate // 24000)
    assert len(y) == expected_len
    if length:
        ref = resample_poly(x.astype(np.float64), resampler.up, resampler.down)
        np.testing.assert_allclose(y, ref, atol=1e-5)


def test_segment_joins_are_contiguous() -> None:
    """Two segments pushed one after the other resample as their concatenation: no restart transient."""
    t = np.arange(4800) / 24000
    a = (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    b = (0.5 * np.sin(2 * np.pi * 220 * (t + t[-1] + 1 / 24000))).astype(np.float32)
    resampler = StreamingResampler(24000, 16000)
    y = np.concatenate([resampler.push(a), resampler.push(b), resampler.flush()])
    ref = resample_poly(np.concatenate([a, b]).astype(np.float64), 2, 3)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    # no click: the largest sample-to-sample step stays that of a 220 Hz sine at 16 kHz
    inner = y[50:-50]
    assert np.max(np.abs(np.diff(inner))) < 0.5 * 2 * np.pi * 220 / 16000 * 1.05


def test_flush_resets_for_the_next_turn() -> None:
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    resampler = StreamingResampler(24000, 8000)
    first = np.concatenate([resampler.push(x), resampler.flush()])
    second = np.concatenate([resampler.push(x), resampler.flush()])
    np.testing.assert_array_equal(first, second)


def test_passthrough_at_24k() -> None:
    x = np.arange(10, dtype=np.float32)
    resampler = StreamingResampler(24000, 24000)
    assert resampler.passthrough
    np.testing.assert_array_equal(resampler.push(x), x)
    assert len(resampler.flush()) == 0


def test_history_stays_bounded() -> None:
    resampler = StreamingResampler(24000, 48000)
    for _ in range(200):
        resampler.push(np.zeros(480, dtype=np.float32))
    assert len(resampler._history) < 480 + 2 * 61
