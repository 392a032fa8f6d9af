"""The model's plain-data face for the serving engine: requests in, numpy audio and durations out.

Only plain data crosses this boundary (str, float, int, numpy arrays), so the engine thread can hand results to
the event loop without sharing tensors. A runner is not thread-safe: one executor thread owns it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rt_server.model.config import SAMPLE_RATE_HZ, tiny_config_dict
from rt_server.model.kmodel import BatchItem, Chunk, KModel, resolve_device, resolve_precision
from rt_server.model.voices import PACK_ROWS, STYLE_DIM, VoiceLibrary, style_row

log = logging.getLogger(__name__)

# `ModelRunner.opening_share`: the rest's synthesis must fit in this share of the opening's playing time.
OPENING_SLACK = 0.5
# Generator lengths built at warm-up (duration frames, 25 ms each): the buckets up to 3.2 s of audio, which hold a
# turn's first windows and most short segments (`KModel.bucket_lengths`).
WARMUP_WINDOW_FRAMES = range(16, 129, 8)
# Prefixes of the warm-up sentence, one per token bucket: 6, 14, ... phonemes are 8, 16, ... tokens with the
# two boundary tokens.
WARMUP_PREFIX_PHONEMES = range(6, 128, 8)
# A sentence of typical length in Kokoro's English phonemes, for the warm-up.
WARMUP_SENTENCE = "ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˌOvəɹ ðə lˈAzi dˈɔɡ."
# What `ModelRunner.prime` runs the model's front over: the sentence's first two words.
PRIME_PHONEMES = "ðə kwˈɪk"


@dataclass(frozen=True)
class SynthesisRequest:
    phonemes: str  # validated against the vocabulary, 1..510 code points
    voice: str  # a voice name or a blend spec "af_bella:0.7,af_sky:0.3"
    speed: float = 1.0
    seed: int | None = None  # None: sine-source noise off (deterministic); an int seeds the noise
    max_lead_frames: int | None = None  # cap on the leading boundary silence (see `BatchItem`)
    max_trail_frames: int | None = None  # cap on the trailing boundary silence
    # Hand the opening (at least this many frames) to `on_partial` before the rest; None: all at once
    first_chunk_frames: int | None = None


@dataclass(frozen=True)
class SynthesisResult:
    audio: np.ndarray  # float32 mono at 24 kHz: samples [offset, offset + len) of the segment
    durations: np.ndarray  # int64 frames per token, boundary tokens included (len == len(phonemes) + 2)
    offset: int = 0  # > 0: the opening went to `on_partial`
    total_samples: int | None = None  # the whole segment, 600 * durations.sum(); None: len(audio)


class ModelRunner:
    """Runs batches of `SynthesisRequest` on one KModel with one voice library."""

    sample_rate_hz = SAMPLE_RATE_HZ

    def __init__(self, model: KModel, voices: VoiceLibrary, *, name: str = "default") -> None:
        if not len(voices):
            raise ValueError(f"model {name!r} has no voices")
        self.model = model
        self.voices = voices
        self.name = name
        self.max_phonemes = model.max_phonemes
        self.device_type = model.device.type
        # Compute seconds per audio second, smoothed over the passes so far: of whole passes, and of the second
        # generator window of `stream_batch` (what the rest of a split item costs once its opening is out).
        self.rtf: float | None = None
        self.rest_rtf: float | None = None
        self._prime_item: BatchItem | None = None

    def opening_share(self) -> float:
        """The share of an item's audio that goes ahead in `stream_batch`: enough that the rest is synthesised
        in half the time the opening plays, at this runner's measured speed r (the rest, (1 - f) of the audio,
        takes about r (1 - f); it must fit in 0.5 f: a machine that slows down between requests, as shared ones
        do, still has the other half). r is the second window's measured
        speed, else (an over-estimate) the whole passes'; a third until anything was measured."""
        rtf = self.rest_rtf if self.rest_rtf is not None else self.rtf
        if rtf is None:
            return 1 / 3
        return min(0.5, max(0.1, rtf / (OPENING_SLACK + rtf)))

    def unknown_symbols(self, phonemes: str) -> list[str]:
        return self.model.unknown_symbols(phonemes)

    def vocabulary(self) -> frozenset[str]:
        """The phoneme symbols the model accepts (plain data, for validation off the engine thread)."""
        return frozenset(self.model.vocab)

    def voice_names(self) -> list[str]:
        return self.voices.names()

    def check_voice(self, spec: str) -> None:
        """Raise `VoiceError` with a clear message if `spec` is not a known voice or a valid blend of them."""
        self.voices.pack(spec)

    def synthesize(
        self,
        requests: Sequence[SynthesisRequest],
        on_partial: Callable[[int, SynthesisResult], None] | None = None,
        opening_share: float | None = None,
    ) -> list[SynthesisResult]:
        """Synthesise one batch in a single forward pass. Raises if the batch fails (all of it).

        With `on_partial` and a request that sets `first_chunk_frames`, the generator runs in two windows
        (`KModel.stream_batch`): the opening of each such request's audio goes to `on_partial(index, result)`
        as soon as the first window is done, and its result holds the rest. The opening is at least
        `opening_share` of the audio (None: `self.opening_share()`)."""
        items = []
        for req in requests:
            style = self._style(req.voice, req.phonemes)
            generator = None if req.seed is None else torch.Generator().manual_seed(req.seed)
            items.append(
                self.model.item(
                    req.phonemes,
                    style,
                    req.speed,
                    noise=req.seed is not None,
                    generator=generator,
                    max_lead_frames=req.max_lead_frames,
                    max_trail_frames=req.max_trail_frames,
                )
            )
        first = [req.first_chunk_frames for req in requests]
        started = time.perf_counter()
        if on_partial is None or not any(first):
            outputs = self.model.forward_batch(items)
            results = [SynthesisResult(o.audio.numpy(), o.pred_dur.numpy().astype(np.int64)) for o in outputs]
        else:
            share = self.opening_share() if opening_share is None else opening_share
            windows = self.model.stream_batch(items, first, first_share=share)
            for index, chunk in enumerate(next(windows)):  # the openings, out before the second window runs
                if len(chunk.audio):
                    on_partial(index, _result(chunk))
            second = time.perf_counter()
            results = [_result(chunk) for chunk in next(windows)]
            rest_s = sum(len(r.audio) for r in results if r.offset) / SAMPLE_RATE_HZ
            if rest_s > 0:
                self.rest_rtf = _smoothed(self.rest_rtf, (time.perf_counter() - second) / rest_s)
        audio_s = sum(r.offset + len(r.audio) for r in results) / SAMPLE_RATE_HZ
        if audio_s > 0:
            self.rtf = _smoothed(self.rtf, (time.perf_counter() - started) / audio_s)
        return results

    def _style(self, voice: str, phonemes: str) -> torch.Tensor:
        """The voice's style row for an utterance of these phonemes."""
        return torch.from_numpy(style_row(self.voices.pack(voice), phonemes).copy())

    def _own_phrase(self, phonemes: str) -> str:
        """`phonemes` for the warm-up and priming, or a short word for a model whose vocabulary lacks them."""
        return "hˈɛloʊ" if self.unknown_symbols(phonemes) else phonemes

    def prime(self, interrupt: Callable[[], bool] | None = None) -> bool:
        """Run the model's front over two words and drop the result, stopping between its parts once
        `interrupt()` is true (`KModel.prime`; returns whether it ran to the end): called by the engine when a
        turn begins after the model sat idle, so that the turn's first segment finds it warm; the engine does so
        on a CPU only, where the idle slow-down was measured (docs/performance.md)."""
        if self._prime_item is None:
            phonemes = self._own_phrase(PRIME_PHONEMES)
            self._prime_item = self.model.item(phonemes, self._style(self.voice_names()[0], phonemes), noise=False)
        return self.model.prime(self._prime_item, interrupt)

    def warmup(self) -> None:
        """A sentence-length synthesis, so the first real request does not pay for lazy initialisation
        (measured: after a one-word warm-up the first sentence took 530 ms instead of 390). A short word for a
        model whose vocabulary lacks the sentence's symbols."""
        phonemes = self._own_phrase(WARMUP_SENTENCE)
        self.synthesize([SynthesisRequest(phonemes, self.voice_names()[0])])
        if self.model.bucket_lengths:
            # The kernels for the lengths that short segments and a turn's first windows are padded to: the
            # sentence's prefixes, one per token bucket, and the frame buckets up to WARMUP_WINDOW_FRAMES.
            style = self._style(self.voice_names()[0], phonemes)
            prefixes = [phonemes[:n] for n in WARMUP_PREFIX_PHONEMES if n < len(phonemes)]
            items = [self.model.item(p, style, noise=False) for p in [*prefixes, phonemes]]
            self.model.warm_lengths(items, WARMUP_WINDOW_FRAMES)
        # And in two windows, as a turn's first segment is: the windows' shapes, and the speed of the second
        # (`opening_share`) measured before the first request.
        self.synthesize([SynthesisRequest(phonemes, self.voice_names()[0], first_chunk_frames=1)], lambda *_: None)


def _smoothed(average: float | None, sample: float) -> float:
    return sample if average is None else 0.8 * average + 0.2 * sample


def _result(chunk: Chunk) -> SynthesisResult:
    return SynthesisResult(
        chunk.audio.numpy(), chunk.pred_dur.numpy().astype(np.int64), chunk.offset, chunk.total_samples
    )


def random_voice_pack(seed: int) -> np.ndarray:
    """A random voice pack [510, 256] (tests only): smooth across rows like real packs."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 0.15, STYLE_DIM)
    drift = rng.normal(0.0, 0.02, STYLE_DIM)
    rows = np.linspace(0.0, 1.0, PACK_ROWS)[:, None]
    return (base + rows * drift).astype(np.float32)


def make_speechlike(model: KModel) -> None:
    """Adjust random weights (tests only) to behave like speech where tests need it: about 4 frames per
    phoneme (a negative duration bias), a voiced F0 near 150 Hz (so the sine source is on), and a quiet output
    (the post-conv gain scaled down so audio stays within [-1, 1])."""
    with torch.no_grad():
        model.predictor.duration_proj.linear_layer.bias.fill_(-2.5)
        f0_bias, post_bias = model.predictor.F0_proj.bias, model.decoder.generator.conv_post.bias
        assert f0_bias is not None and post_bias is not None
        f0_bias.fill_(150.0)
        model.decoder.generator.conv_post.weight_g.mul_(0.05)
        post_bias.fill_(0.0)
        # The harmonic source's STFT phase is atan2 of rounding noise in its near-silent bins, and random
        # weights amplify that chaotically (docs/model.md). Tests compare audio across batch sizes, so the
        # random models read only the source's magnitudes.
        half = model.config.istftnet.gen_istft_n_fft // 2 + 1
        for conv in model.decoder.generator.noise_convs:
            assert isinstance(conv, torch.nn.Conv1d)
            conv.weight[:, half:].zero_()
    model.fold_weight_norm()


def tiny_model(seed: int = 0) -> KModel:
    """The tiny configuration with seeded random weights made speech-like (see `make_speechlike`)."""
    torch.manual_seed(seed)
    model = KModel(tiny_config_dict())
    make_speechlike(model)
    return model


def tiny_runner(*, seed: int = 0, name: str = "tiny") -> ModelRunner:
    """A fast runner for tests: tiny config, random weights, voices "af_test" and "am_test"."""
    voices = VoiceLibrary({"af_test": random_voice_pack(seed + 1), "am_test": random_voice_pack(seed + 2)})
    return ModelRunner(tiny_model(seed), voices, name=name)


def load_runner(
    name: str,
    *,
    config: str | Path | None,
    weights: str | Path | None,
    voices_dir: str | Path | None,
    device: str = "auto",
    precision: str = "auto",
    compile_kernels: bool = True,
) -> ModelRunner:
    """Load a model for serving. With no weights configured, the imported default (see docs/weights.md).

    `precision="auto"` picks int8 or bf16 where the hardware computes them natively (`resolve_precision`); with reduced
    precision, `compile_kernels` compiles the decoder's fused kernels now (see `KModel.compile_kernels`)."""
    if weights is None:
        from rt_server.weights import ensure_default_weights

        default = ensure_default_weights()
        weights, config = default.checkpoint, config or default.config
        voices_dir = voices_dir or default.voices_dir
    if voices_dir is None:
        raise ValueError(f"model {name!r}: no voices directory configured")
    precision = resolve_precision(precision, resolve_device(device))
    model = KModel(config, weights, device=device, precision=precision)
    voices = VoiceLibrary.from_directory(voices_dir)
    compiled = False
    if compile_kernels and precision != "fp32":
        # Inductor's code cache with the weights (default: /tmp, lost on every container restart).
        from rt_server.weights import default_home

        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_home() / "inductor-cache"))
        started = time.monotonic()
        compiled = model.compile_kernels()
        elapsed_s = time.monotonic() - started
        log.info("model %s: compiled kernels %s (%.1f s)", name, "on" if compiled else "off", elapsed_s)
    log.info(
        "model %s loaded on %s (%s%s) with %d voices",
        name,
        model.device,
        precision,
        ", compiled kernels" if compiled else "",
        len(voices),
    )
    return ModelRunner(model, voices, name=name)
