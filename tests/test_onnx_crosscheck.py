"""Our KModel with the imported weights against an independent runtime: onnxruntime running the same ONNX file.

Waveforms cannot be compared sample by sample (small F0 differences drift the sine phase), so this compares what
can be: the number of duration frames (ours: `pred_dur.sum()`; theirs: audio length / 600, the graph has no
duration output) and log-mel spectrograms. The graph's inverse STFT is 1.5x louder than torch.istft (sum of the
squared periodic Hann window of 20 over the hop of 5); its audio is scaled back before comparing.

onnxruntime also quantizes activations at run time, so its float durations differ from ours by about 0.1 frame
per token (occasionally more, up to a frame on the long leading-silence token). A token whose duration lies that
close to a rounding boundary can round the other way in one runtime and shift everything after it by a frame,
which no frame-by-frame spectrogram comparison survives.
The sentences below were picked so that no token of either runtime lies within 0.148 frame of a .5 boundary: the
comparison then tests the weights and the model, not a coin toss. (Over 30 short sentences x 5 voices, 144 of 150
runs had total frames within one of onnxruntime's.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from audio_metrics import spectral_correlation

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE_HZ = 24_000
SAMPLES_PER_FRAME = 600
ORT_ISTFT_GAIN = 1.5
MIN_CORRELATION = 0.97

# (voice, English text, phonemes from misaki EspeakG2P(language="en-us"))
CASES: tuple[tuple[str, str, str], ...] = (
    ("jf_alpha", "I like to read books.", "I lˈIk tə ɹˈiːd bˈʊks."),
    ("jm_kumo", "Time to go to bed.", "tˈIm tə ɡˌO tə bˈɛd."),
    ("jf_tebukuro", "The garden looks lovely.", "ðə ɡˈɑːɹdən lˈʊks lˈʌvli."),
)


def test_spectral_correlation_is_level_invariant_and_detects_shifts() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(SAMPLE_RATE_HZ) / SAMPLE_RATE_HZ
    tone = np.sin(2 * np.pi * 440 * t * (1 + t)) * (t < 0.6) + 0.01 * rng.standard_normal(t.size)
    assert spectral_correlation(tone, 1.5 * tone) > 0.999
    assert spectral_correlation(tone, np.roll(tone, SAMPLE_RATE_HZ // 5)) < 0.9


@dataclass(frozen=True)
class Runtimes:
    model: Any  # our KModel with the imported weights
    session: Any  # onnxruntime.InferenceSession on the same ONNX file
    voices_dir: Path


@pytest.fixture(scope="module")
def runtimes() -> Runtimes:
    from rt_server.weights import import_weights
    from rt_server.weights.sources import REQUIREMENTS, assemble_onnx, missing_requirements, part_files

    missing = missing_requirements(REQUIREMENTS)
    if missing:
        pytest.skip("weight packages not installed: " + ", ".join(r.spec for r in missing))
    ort = pytest.importorskip("onnxruntime")
    from rt_server.model.kmodel import KModel

    paths = import_weights(Path(os.environ.get("RT_SERVER_HOME") or REPO / ".rt_home"), install=False).paths
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(assemble_onnx(part_files()), options, providers=["CPUExecutionProvider"])
    return Runtimes(KModel(paths.config, model=paths.checkpoint), session, paths.voices_dir)


@pytest.mark.real_weights
@pytest.mark.parametrize(("voice", "text", "phonemes"), CASES, ids=[c[0] for c in CASES])
def test_durations_and_spectra_match_onnxruntime(runtimes: Runtimes, voice: str, text: str, phonemes: str) -> None:
    import torch

    from rt_server.model.voices import load_voice_file, style_row

    pack = load_voice_file(runtimes.voices_dir / f"{voice}.pt")[voice]
    ref_s = style_row(pack, phonemes)
    ids = runtimes.model.tokenize(phonemes)
    ours_t, pred_dur = runtimes.model.forward_with_tokens(
        torch.tensor([ids]), torch.from_numpy(ref_s)[None], 1.0, noise=False
    )
    ours = ours_t.numpy()
    feeds = {
        "tokens": np.array([ids], dtype=np.int64),
        "style": ref_s[None].astype(np.float32),
        "speed": np.array([1.0], dtype=np.float32),
    }
    theirs = runtimes.session.run(None, feeds)[0].reshape(-1)

    assert theirs.size % SAMPLES_PER_FRAME == 0
    our_frames, their_frames = int(pred_dur.sum()), theirs.size // SAMPLES_PER_FRAME
    assert ours.size == our_frames * SAMPLES_PER_FRAME
    assert abs(our_frames - their_frames) <= 1, f"{text!r}: {our_frames} frames vs onnxruntime {their_frames}"

    level_ratio = float(np.sqrt(np.mean(theirs**2) / np.mean(ours**2)))
    assert 1.3 < level_ratio < 1.7, f"level ratio {level_ratio:.2f}, expected about {ORT_ISTFT_GAIN}"
    corr = spectral_correlation(ours, theirs / ORT_ISTFT_GAIN)
    print(f"\n{voice} {text!r}: frames {our_frames} vs {their_frames}, log-mel correlation {corr:.4f}")
    assert corr >= MIN_CORRELATION, f"{text!r}: log-mel correlation {corr:.4f} < {MIN_CORRELATION}"
