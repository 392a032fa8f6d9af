"""A streaming polyphase resampler: chunked input gives the same samples as one `scipy.signal.resample_poly`
call.

Segments of a turn are pushed one after another; the resampler keeps the filter history across pushes, so
segment joins are contiguous (no restart transient, no click) and the output equals resampling the turn's
concatenated audio in one go. `flush` ends the stream: it emits the tail that needs the zero padding after the
last sample and resets, ready for the next turn.
"""

from __future__ import annotations

from math import gcd
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy.signal import firwin

FloatArray = npt.NDArray[np.float32]

# Outputs computed per vectorised block: bounds the (block x taps) scratch matrix to 8192 * 61 * 8 B ~ 4 MiB.
_BLOCK_OUTPUTS: Final = 8192


class StreamingResampler:
    """Resample a mono float32 stream from `in_rate_hz` to `out_rate_hz`.

    The filter is the one `resample_poly` designs by default: a Kaiser-windowed (beta 5) low-pass FIR with
    `10 * max(up, down)` taps each side of the centre, cut off at the lower Nyquist, centred so output sample
    n sits at input time `n * down / up`. Memory: the history kept between pushes is one filter span (at most
    61 input samples) plus the samples of the current push.
    """

    def __init__(self, in_rate_hz: int, out_rate_hz: int) -> None:
        if in_rate_hz <= 0 or out_rate_hz <= 0:
            raise ValueError("sample rates must be positive")
        g = gcd(in_rate_hz, out_rate_hz)
        self.up = out_rate_hz // g
        self.down = in_rate_hz // g
        self.passthrough = self.up == self.down
        if self.passthrough:  # no filter: firwin cannot design a cut-off at Nyquist, and none is needed
            self.up = self.down = 1
            self._half_len, self._num_taps = 0, 1
            self._bank_rev = np.ones((1, 1), dtype=np.float64)
            self.reset()
            return
        max_rate = max(self.up, self.down)
        self._half_len = 10 * max_rate
        taps = firwin(2 * self._half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)) * self.up
        self._num_taps = -(-len(taps) // self.up)  # taps per phase, ceil
        bank = np.zeros((self.up, self._num_taps), dtype=np.float64)
        for phase in range(self.up):
            phase_taps = taps[phase :: self.up]
            bank[phase, : len(phase_taps)] = phase_taps
        # Reversed so a forward window x[base - Q + 1 .. base] dots with it: bank_rev[p][Q - 1 - i]
        # hits x[base - i].
        self._bank_rev = bank[:, ::-1].copy()
        self.reset()

    def reset(self) -> None:
        """Start a new stream (zero history, as at the start of `resample_poly`'s input)."""
        # `_history` holds input samples with absolute indices [_history_start, _num_in); indices <
        # 0 are zeros.
        self._history = np.zeros(self._num_taps, dtype=np.float64)
        self._history_start = -self._num_taps
        self._num_in = 0
        self._num_out = 0

    def _base(self, n: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        m = n * self.down + self._half_len
        return m // self.up, m % self.up

    def _ready_outputs(self, limit_in: int) -> int:
        """How many outputs (from index 0) need no input at or beyond absolute index `limit_in`."""
        # output n needs x[base(n)], base(n) = (n * down + H) // up < limit_in  <=>  n * down + H <
        # limit_in * up
        return max(0, -(-(limit_in * self.up - self._half_len) // self.down))

    def _produce(self, end_out: int) -> FloatArray:
        pieces: list[npt.NDArray[np.float64]] = []
        for start in range(self._num_out, end_out, _BLOCK_OUTPUTS):
            n = np.arange(start, min(end_out, start + _BLOCK_OUTPUTS), dtype=np.int64)
            base, phase = self._base(n)
            first = base - self._num_taps + 1 - self._history_start
            windows = np.lib.stride_tricks.sliding_window_view(self._history, self._num_taps)[first]
            pieces.append(np.einsum("ij,ij->i", windows, self._bank_rev[phase]))
        self._num_out = max(self._num_out, end_out)
        self._trim()
        if not pieces:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(pieces).astype(np.float32)

    def _trim(self) -> None:
        base, _ = self._base(np.array([self._num_out], dtype=np.int64))
        keep_from = int(base[0]) - self._num_taps + 1
        drop = keep_from - self._history_start
        if drop > 0:
            self._history = self._history[drop:]
            self._history_start = keep_from

    def push(self, samples: FloatArray) -> FloatArray:
        """Feed input samples; returns every output sample that no longer depends on future input."""
        if self.passthrough:
            return np.asarray(samples, dtype=np.float32)
        if len(samples):
            self._history = np.concatenate([self._history, np.asarray(samples, dtype=np.float64)])
            self._num_in += len(samples)
        return self._produce(self._ready_outputs(self._num_in))

    def flush(self) -> FloatArray:
        """End the stream: emit the remaining outputs (`ceil(num_in * up / down)` in all) and reset."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        total_out = -(-self._num_in * self.up // self.down)
        self._history = np.concatenate([self._history, np.zeros(self._num_taps + 1, dtype=np.float64)])
        tail = self._produce(total_out)
        self.reset()
        return tail

    def output_samples_for(self, num_in: int) -> float:
        """The output length that `num_in` input samples correspond to (for timeline bookkeeping)."""
        return num_in * self.up / self.down
