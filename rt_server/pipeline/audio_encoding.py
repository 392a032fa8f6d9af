"""Wire encodings of mono audio: `pcm_s16le`, `pcm_f32le` and `mulaw` (ITU-T G.711 mu-law, 8 bits).

Pure numpy. Input is float32 nominally in [-1, 1]; the model does not clip, so s16 and mu-law clip here and
f32 is sent as it is.
"""

from __future__ import annotations

from functools import cache
from typing import Final

import numpy as np
import numpy.typing as npt

from rt_server.protocol import Encoding

FloatArray = npt.NDArray[np.float32]

BYTES_PER_SAMPLE: Final[dict[Encoding, int]] = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1}

# G.711 mu-law on 14-bit magnitudes, as in the Sun reference g711.c (and CPython's audioop): bias 33, clip
# 8159,
# segment end points of the eight chords.
_MULAW_BIAS_14: Final = 0x21
_MULAW_CLIP_14: Final = 8159
_MULAW_SEGMENT_ENDS: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_MULAW_BIAS: Final = 0x84  # the 16-bit expansion bias used when decoding


def float_to_s16(samples: FloatArray) -> npt.NDArray[np.int16]:
    """Round to nearest after clipping to [-1, 1] and scaling by 32767 (symmetric, so -1.0 maps to -32767)."""
    scaled: npt.NDArray[np.int16] = np.rint(np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
    return scaled


@cache
def _mulaw_table() -> npt.NDArray[np.uint8]:
    """The mu-law byte for every int16 value, indexed by `value + 32768` (built once, 64 KiB)."""
    pcm14 = np.arange(-32768, 32768, dtype=np.int32) >> 2  # arithmetic shift, as the reference does
    mask = np.where(pcm14 < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm14), _MULAW_CLIP_14) + _MULAW_BIAS_14
    segment = np.searchsorted(_MULAW_SEGMENT_ENDS, magnitude).astype(np.int32)  # 8: beyond the last chord
    value = np.where(segment >= 8, 0x7F, (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F))
    return (value ^ mask).astype(np.uint8)


def s16_to_mulaw(pcm: npt.NDArray[np.int16]) -> npt.NDArray[np.uint8]:
    return _mulaw_table()[pcm.astype(np.int32) + 32768]


def mulaw_to_s16(data: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    """G.711 mu-law decoding (exact inverse of the reference expansion)."""
    u = (~data.astype(np.int32)) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _MULAW_BIAS) << exponent) - _MULAW_BIAS
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def encode(samples: FloatArray, encoding: Encoding) -> bytes:
    """Encode float32 mono samples: `len(result) == len(samples) * BYTES_PER_SAMPLE[encoding]`."""
    if encoding == "pcm_f32le":
        return np.asarray(samples, dtype="<f4").tobytes()
    pcm = float_to_s16(samples)
    if encoding == "pcm_s16le":
        return pcm.astype("<i2").tobytes()
    return s16_to_mulaw(pcm).tobytes()


def decode(data: bytes, encoding: Encoding) -> FloatArray:
    """Decode wire bytes back to float32 samples (s16 and mu-law scaled by 1/32767)."""
    if encoding == "pcm_f32le":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if encoding == "pcm_s16le":
        pcm = np.frombuffer(data, dtype="<i2")
    else:
        pcm = mulaw_to_s16(np.frombuffer(data, dtype=np.uint8))
    return (pcm.astype(np.float32) / 32767.0).astype(np.float32)
