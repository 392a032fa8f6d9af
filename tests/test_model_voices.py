"""Voice packs: formats, validation, style rows, blends, and names that never become paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from crafted import write_code_pickle

from rt_server.model.runner import random_voice_pack
from rt_server.model.voices import VoiceError, VoiceLibrary, load_voice_file, parse_blend, style_row


@pytest.fixture
def voice_dir(tmp_path: Path) -> Path:
    a, b, c = random_voice_pack(1), random_voice_pack(2), random_voice_pack(3)
    torch.save(torch.from_numpy(a).reshape(510, 1, 256), tmp_path / "af_alpha.pt")
    b.astype("<f4").tofile(tmp_path / "am_beta.bin")
    np.savez(tmp_path / "pack.npz", bf_gamma=c.reshape(510, 1, 256), bm_delta=a * 0.5)
    (tmp_path / "notes.txt").write_text("not a voice")
    return tmp_path


def test_all_formats_load_from_a_directory(voice_dir: Path) -> None:
    lib = VoiceLibrary.from_directory(voice_dir)
    assert lib.names() == ["af_alpha", "am_beta", "bf_gamma", "bm_delta"]
    np.testing.assert_array_equal(lib.pack("af_alpha"), random_voice_pack(1))
    np.testing.assert_array_equal(lib.pack("am_beta"), random_voice_pack(2))
    np.testing.assert_array_equal(lib.pack("bf_gamma"), random_voice_pack(3))


def test_style_row_is_phoneme_count_minus_one() -> None:
    pack = np.arange(510 * 256, dtype=np.float32).reshape(510, 256)
    np.testing.assert_array_equal(style_row(pack, "a"), pack[0])
    np.testing.assert_array_equal(style_row(pack, "həlˈO"), pack[4])  # 5 code points


def test_blend_weights_are_normalised(voice_dir: Path) -> None:
    lib = VoiceLibrary.from_directory(voice_dir)
    blended = lib.pack("af_alpha:3,am_beta:1")
    expected = 0.75 * random_voice_pack(1) + 0.25 * random_voice_pack(2)
    np.testing.assert_allclose(blended, expected, rtol=1e-6, atol=1e-7)
    assert parse_blend("a:1,b:1") == [("a", 0.5), ("b", 0.5)]
    assert parse_blend("solo") == [("solo", 1.0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "invalid voice spec"),
        ("a,,b", "invalid voice spec"),
        ("../../etc/passwd", "invalid voice name"),
        ("a/b", "invalid voice name"),
        ("a:0", "must be a positive number"),
        ("a:-1", "must be a positive number"),
        ("a:nan", "must be a positive number"),
        ("a:x", "invalid weight"),
        ("a:1,a:2", "names a voice twice"),
        ("a:1e308,b:1e308", "not a finite number"),
    ],
)
def test_bad_specs_are_rejected(spec: str, message: str) -> None:
    with pytest.raises(VoiceError, match=message):
        parse_blend(spec)


def test_unknown_voice_lists_the_available_ones(voice_dir: Path) -> None:
    lib = VoiceLibrary.from_directory(voice_dir)
    with pytest.raises(VoiceError, match="unknown voice 'nobody'; available: af_alpha, am_beta"):
        lib.pack("nobody")


def test_lookup_never_touches_the_file_system(voice_dir: Path) -> None:
    lib = VoiceLibrary.from_directory(voice_dir)
    (voice_dir / "late_voice.pt").write_bytes(b"added after loading")
    with pytest.raises(VoiceError, match="unknown voice"):
        lib.pack("late_voice")


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("short.bin", np.zeros(100, dtype="<f4").tobytes(), "expected 130560 float32 values"),
        ("bad.pt", None, r"must be \[510, 1, 256\]"),
        ("nan.bin", np.full(510 * 256, np.nan, dtype="<f4").tobytes(), "non-finite"),
        ("junk.pt", b"not a zip or pickle", "cannot load voice file"),
    ],
)
def test_malformed_packs_are_rejected(tmp_path: Path, name: str, data: bytes | None, message: str) -> None:
    path = tmp_path / name
    if data is None:
        torch.save(torch.zeros(10, 256), path)
    else:
        path.write_bytes(data)
    with pytest.raises(VoiceError, match=message):
        load_voice_file(path)


def test_real_english_packs_load(shared_voices_dir: Path) -> None:
    lib = VoiceLibrary.from_directory(shared_voices_dir)
    assert {"af_heart", "am_michael"} <= set(lib.names())
    heart = lib.pack("af_heart")
    # Statistics of the published af_heart pack (reference spec, section 5).
    assert heart.min() == pytest.approx(-1.509776, abs=1e-5)
    assert heart.max() == pytest.approx(1.756575, abs=1e-5)
    assert float(heart.mean()) == pytest.approx(-0.004483, abs=1e-5)


def test_voice_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    write_code_pickle(path, marker)
    with pytest.raises(VoiceError, match="cannot load voice file"):
        load_voice_file(path)
    assert not marker.exists()
