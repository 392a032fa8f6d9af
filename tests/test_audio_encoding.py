"""Wire encodings: s16 rounding and clipping, f32 passthrough, G.711 mu-law against the reference codec."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest

from rt_server.pipeline.audio_encoding import (
    BYTES_PER_SAMPLE,
    decode,
    encode,
    float_to_s16,
    mulaw_to_s16,
    s16_to_mulaw,
)


def test_s16_scaling_rounding_and_clipping() -> None:
    x = np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.5, 1 / 65534], dtype=np.float32)
    assert float_to_s16(x).tolist() == [0, 32767, -32767, 32767, -32767, 16384, 0]
    data = encode(x, "pcm_s16le")
    assert len(data) == len(x) * 2
    assert np.frombuffer(data, "<i2").tolist() == float_to_s16(x).tolist()


def test_f32_is_sent_unclipped_and_little_endian() -> None:
    x = np.array([0.25, -1.5, 3.0], dtype=np.float32)
    data = encode(x, "pcm_f32le")
    assert np.array_equal(np.frombuffer(data, "<f4"), x)
    assert np.array_equal(decode(data, "pcm_f32le"), x)


def test_lengths() -> None:
    x = np.zeros(37, dtype=np.float32)
    for encoding, width in BYTES_PER_SAMPLE.items():
        assert len(encode(x, encoding)) == 37 * width


def _reference_codec():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ModuleNotFoundError:  # Python 3.13 removed it
            pytest.skip("audioop (the reference G.711 codec) is not available")


def test_mulaw_matches_the_reference_codec_for_every_s16_value() -> None:
    audioop = _reference_codec()
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    expected = np.frombuffer(audioop.lin2ulaw(pcm.tobytes(), 2), dtype=np.uint8)
    assert np.array_equal(s16_to_mulaw(pcm), expected)
    codes = np.arange(256, dtype=np.uint8)
    expected_pcm = np.frombuffer(audioop.ulaw2lin(codes.tobytes(), 2), dtype=np.int16)
    assert np.array_equal(mulaw_to_s16(codes), expected_pcm)


def test_mulaw_round_trip_error_is_within_its_quantisation() -> None:
    x = np.sin(np.linspace(0, 40, 4000)).astype(np.float32) * 0.8
    y = decode(encode(x, "mulaw"), "mulaw")
    # mu-law steps are ~1/16 of the magnitude's chord; relative error stays under ~6% (plus a small floor)
    assert np.all(np.abs(y - x) <= 0.07 * np.abs(x) + 0.002)
