"""A session's audio output chain: 24 kHz float32 in, frames of the negotiated rate and encoding out. Pure.

resample (streaming, contiguous across segments) -> encode -> frame. A stream is a turn: `end_stream` (on
`flush` and `close`) emits the resampler's tail and the shorter last frame, and the next turn starts afresh.
It also keeps the session's audio timeline: output samples produced so far, in the client's sample rate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from rt_server.pipeline.audio_encoding import BYTES_PER_SAMPLE, encode
from rt_server.pipeline.framing import Framer, frame_bytes_for
from rt_server.pipeline.jobs import SOURCE_SAMPLE_RATE_HZ
from rt_server.pipeline.outbox import AudioFrame
from rt_server.pipeline.resampler import StreamingResampler
from rt_server.protocol import Encoding


class AudioOutput:
    def __init__(self, *, encoding: Encoding, sample_rate_hz: int, frame_ms: int) -> None:
        self.encoding = encoding
        self.sample_rate_hz = sample_rate_hz
        self.frame_ms = frame_ms
        self._bytes_per_sample = BYTES_PER_SAMPLE[encoding]
        frame_bytes = frame_bytes_for(
            frame_ms=frame_ms, sample_rate_hz=sample_rate_hz, bytes_per_sample=self._bytes_per_sample
        )
        self._framer = Framer(frame_bytes, self._bytes_per_sample)
        self._resampler = StreamingResampler(SOURCE_SAMPLE_RATE_HZ, sample_rate_hz)
        self._stream_base_samples = 0  # timeline position (output samples) where the current stream began
        self._stream_in_samples = 0  # 24 kHz samples pushed in the current stream

    @property
    def position_samples(self) -> float:
        """The timeline position of the next sample pushed, in output samples."""
        return self._stream_base_samples + self._resampler.output_samples_for(self._stream_in_samples)

    def samples_to_ms(self, num_samples: float) -> float:
        return num_samples * 1000.0 / self.sample_rate_hz

    @property
    def pending_ms(self) -> float:
        """Audio held in the framer, waiting to fill a frame."""
        return self.samples_to_ms(self._framer.pending_bytes / self._bytes_per_sample)

    def push(self, samples: npt.NDArray[np.float32]) -> list[AudioFrame]:
        """Feed 24 kHz samples; returns the full frames now ready."""
        self._stream_in_samples += len(samples)
        return self._frames(self._framer.push(encode(self._resampler.push(samples), self.encoding)))

    def end_stream(self) -> list[AudioFrame]:
        """End the turn: the resampler's tail, then the last (possibly shorter) frame."""
        tail = self._resampler.flush()
        frames = self._frames(self._framer.push(encode(tail, self.encoding)))
        last = self._framer.flush()
        if last is not None:
            frames.extend(self._frames([last]))
        self._stream_base_samples += -(-self._stream_in_samples * self._resampler.up // self._resampler.down)
        self._stream_in_samples = 0
        return frames

    def reset(self, position_samples: int) -> None:
        """Drop everything not yet framed (on `clear`); the timeline resumes at `position_samples`."""
        self._resampler.reset()
        self._framer.reset()
        self._stream_base_samples = position_samples
        self._stream_in_samples = 0

    def _frames(self, chunks: list[bytes]) -> list[AudioFrame]:
        frames = []
        for chunk in chunks:
            n = len(chunk) // self._bytes_per_sample
            frames.append(AudioFrame(chunk, n, self.samples_to_ms(n)))
        return frames
