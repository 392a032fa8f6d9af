"""Spectral measures for comparing audio whose waveforms cannot be compared sample by sample."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE_HZ = 24_000
FloatArray = npt.NDArray[np.float64]


@cache
def mel_filterbank(sample_rate_hz: int, n_fft: int, n_mels: int) -> FloatArray:
    """Triangular filters equally spaced on the HTK mel scale from 0 Hz to Nyquist, [n_mels, n_fft // 2 + 1]."""

    def hz_to_mel(f: FloatArray) -> FloatArray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: FloatArray) -> FloatArray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(np.array(sample_rate_hz / 2)), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate_hz)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


def log_mel(audio: npt.NDArray[Any], n_fft: int = 1024, hop: int = 256, n_mels: int = 80) -> FloatArray:
    """Natural-log mel power spectrogram [frames, n_mels] (periodic Hann window, no padding, floor 1e-5)."""
    x = audio.astype(np.float64)
    window = np.hanning(n_fft + 1)[:-1]
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel: FloatArray = np.log(power @ mel_filterbank(SAMPLE_RATE_HZ, n_fft, n_mels).T + 1e-5)
    return mel


def spectral_correlation(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> float:
    """Pearson correlation of two log-mel spectrograms over their common frames."""
    mel_a, mel_b = log_mel(a), log_mel(b)
    n = min(len(mel_a), len(mel_b))
    return float(np.corrcoef(mel_a[:n].ravel(), mel_b[:n].ravel())[0, 1])
