"""KModel: Kokoro-82M v1.0, phonemes and a style vector in, 24 kHz audio out. Batched exactly.

`model(phonemes, ref_s, speed)` and `forward_with_tokens(input_ids, ref_s, speed)` mirror the reference.
`forward_batch(items)` runs many utterances in one pass; each item computes what it computes alone (padding is
masked everywhere the reference would see it; see docs/model.md).

Noise: the sine source adds Gaussian noise. `noise=False` switches it off (output is then deterministic);
`generator=` seeds it per call. Noise is drawn on the CPU with the reference's layout, so a generator seeded with
`s` reproduces the reference run after `torch.manual_seed(s)` on the CPU, and results do not depend on the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rt_server.model.albert import CustomAlbert
from rt_server.model.checkpoint import SECTIONS, Checkpoint, CheckpointError, load_checkpoint
from rt_server.model.config import PAD_TOKEN_ID, SAMPLES_PER_FRAME, KokoroConfig, load_config
from rt_server.model.istftnet import HARMONIC_NUM, AdaINResBlock1, Decoder, FrameGeometry
from rt_server.model.kernels import (
    AdainAct,
    adain_act_eager,
    apply_mask,
    compiled_adain_act,
    compiled_quantize_u8,
    quantize_u8,
)
from rt_server.model.layers import (
    AdaIN1d,
    InstanceNormAffine,
    PackableLinear,
    WeightNormMixin,
    int8_convolution_available,
    sequence_mask,
    weight_packing_available,
)
from rt_server.model.prosody import ProsodyPredictor, TextEncoder, expand_to_frames
from rt_server.model.styles import StyleAffines

log = logging.getLogger(__name__)

_FADE_SAMPLES = 120  # 5 ms at 24 kHz, where boundary silence is cut (`_trim_boundaries`)
# Frames of context a generator window runs beyond the audio it returns where the item goes on: the generator's
# convolutions reach 5.4 frames (136 ms) each way (through the sine source's branch; 4.1 through the main one),
# so neither the audio kept nor the seam where the windows are faded together sees a window's edge.
GENERATOR_CONTEXT_FRAMES = 6
_SEAM_SAMPLES = 240  # 10 ms: where `stream_batch`'s second window fades in over the first
# Generator windows `KModel.compile_kernels` runs while warming up (see `_warm_kernels`).
_WARM_WINDOW_FRAMES = (9, 26, 33, 40, 64, 100, 200)
# Lengths padded to `bucket_length` are multiples of this many tokens or frames (200 ms) at least.
_BUCKET_MIN_STEP = 8
# The dtype the decoder computes in; "int8" is bf16 with the generator's residual convolutions in int8 (CPU).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16}
# Buffers some transformers versions saved with ALBERT; harmless and ignored on load.
_IGNORED_KEYS = {"bert": {"embeddings.position_ids"}}


class PhonemeError(ValueError):
    """Phonemes outside the vocabulary, an empty input, or more than the model's 510-phoneme limit."""

    def __init__(self, message: str, unknown: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.unknown = list(unknown)


@dataclass
class BatchItem:
    """One utterance of a batch. `input_ids` includes the two boundary 0-tokens; `ref_s` is [256].

    `max_lead_frames` / `max_trail_frames` cap the frames of the leading / trailing boundary token returned
    (the silence the model puts before the first and after the last phoneme; about 17 and 13 frames). A
    streaming server caps them where a segment joins its neighbour in mid-sentence, and before the first word
    of a turn, so the listener hears no sentence-length pause there. The model still synthesises the full
    boundary (see `_trim_boundaries`); the audio and durations returned are cut.
    """

    input_ids: Tensor
    ref_s: Tensor
    speed: float = 1.0
    noise: bool = True
    generator: torch.Generator | None = None
    max_lead_frames: int | None = None
    max_trail_frames: int | None = None


@dataclass
class BatchOutput:
    audio: Tensor  # [600 * pred_dur.sum()] float32, on the CPU
    pred_dur: Tensor  # [T] frames per token, boundary tokens included


@dataclass
class Chunk:
    """A piece of one item's audio from `KModel.stream_batch`: samples [offset, offset + len(audio)) of the
    `total_samples` the item's `BatchOutput` would hold (`pred_dur` is that output's, complete in every chunk)."""

    audio: Tensor
    pred_dur: Tensor
    offset: int
    total_samples: int


@dataclass
class _Prepared:
    """A batch up to the generator (`KModel._prepare`): decoder features [B, C, 2F], the sine source's STFT
    [B, n_fft + 2, 120F + 1], acoustic styles [B, 128] (with the fused layers' affines under reduced
    precision: `Decoder.style_affines`), geometry, and each item's durations (CPU)."""

    x: Tensor
    har: Tensor
    s: Tensor | StyleAffines
    geo: FrameGeometry
    pred_dur: list[Tensor]


def bucket_length(n: int) -> int:
    """The length n tokens or frames are padded to when `KModel.bucket_lengths` is on: a multiple of 8 up to
    128, then of an eighth of the power of two at or below n (at most 12.5 % more work, 6 % on average).
    oneDNN builds a convolution's (and an LSTM's) kernels for each input length it meets, and on CPUs with AMX
    that takes 50-120 ms per generator convolution (about 1 s for a generator pass in int8, 0.1 s in bf16, and
    25-50 ms for the model's front); a few dozen lengths instead of every length lets them be built once, at
    warm-up or on first use."""
    if n < 1:
        raise ValueError("a length to bucket must be at least 1")
    step = max(_BUCKET_MIN_STEP, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: on a CPU with AVX512-BF16 and AVX512-VNNI but no AMX, int8 (bf16 with the generator's
    convolutions in int8: 1.2-1.3x bf16's speed there); on a CPU with AMX, or with AVX512-BF16 alone, bf16; on
    a CUDA GPU that computes bf16 natively, bf16; else fp32. Other values pass through.

    With AMX, oneDNN's int8 convolutions are no faster than its bf16 ones for the short windows that decide
    the time to first audio (150 against 105 ms for a 33-frame window), and building them for a new length
    costs about ten times as much (docs/performance.md)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":  # native bf16 from Ampere (compute capability 8.0) on; older GPUs emulate it
        return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    if device.type != "cpu":
        return "fp32"
    flags = _cpu_flags()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return "fp32"
    if "amx_bf16" in flags:
        return "bf16"
    return "int8" if "avx512_vnni" in flags and int8_convolution_available() else "bf16"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return set(next((line for line in info if line.startswith("flags")), "").split())
    except OSError:
        return set()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class KModel(nn.Module):
    """Kokoro v1.0. Build from a config (path, dict or None for the bundled v1.0) and load a checkpoint.

    `model` is a checkpoint path (.pth or .safetensors), an already loaded state (sections), or None for random
    weights (tests). Loading is strict: see `load_weights`.
    """

    def __init__(
        self,
        config: str | Path | dict[str, Any] | KokoroConfig | None = None,
        model: str | Path | Checkpoint | None = None,
        *,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        cfg = load_config(config)
        self.config = cfg
        self.vocab = cfg.vocab
        self.max_phonemes = cfg.max_phonemes
        self.precision = precision
        self.bert = CustomAlbert(cfg.plbert, cfg.n_token)
        self.bert_encoder = PackableLinear(cfg.plbert.hidden_size, cfg.hidden_dim)
        self.predictor = ProsodyPredictor(cfg.style_dim, cfg.hidden_dim, cfg.n_layer, cfg.max_dur)
        self.text_encoder = TextEncoder(cfg.hidden_dim, cfg.text_encoder_kernel_size, cfg.n_layer, cfg.n_token)
        self.decoder = Decoder(cfg.hidden_dim, cfg.style_dim, cfg.decoder_width, cfg.asr_res_dim, cfg.istftnet)
        if model is not None:
            self.load_weights(load_checkpoint(model) if isinstance(model, str | Path) else model)
        self.eval()
        self.to(resolve_device(device))
        self.set_precision(precision)

    def set_precision(self, precision: str) -> None:
        """`fp32` computes every layer in the reference's operation order (it matches the reference to float
        rounding). `bf16`/`fp16` run the decoder's convolutions in that precision (weights folded into it once)
        and fuse its AdaIN and Snake element-wise work (the AdaIN layers' style projections in float32, all in
        one product per batch: `Decoder.project_styles`); durations, F0 and energy, the sine source and both
        STFTs stay in float32. `int8` (a CPU with oneDNN; fast where it has VNNI) is bf16 with the
        convolutions of the generator's residual blocks, nearly all of its work, in int8: weights per output
        channel, activations per call and tensor (`layers.Int8Conv1d`). An item's int8 result then depends on
        the largest activation in its batch, so batched items are close to, not equal to, their single runs.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision == "int8" and (self.device.type != "cpu" or not int8_convolution_available()):
            raise ValueError("precision int8 needs a CPU and a torch with oneDNN's int8 convolution")
        self.precision = precision
        # Reduced precision on a CPU runs oneDNN kernels built per input length: pad tokens, frames and the
        # generator's windows to a few lengths (`bucket_length`). fp32 keeps the reference's exact, unpadded path.
        self.bucket_lengths = precision != "fp32" and self.device.type == "cpu"
        reduced = PRECISIONS[precision] if precision != "fp32" else None
        self._set_kernel(adain_act_eager)  # compiled for the old dtype: call `compile_kernels` again
        for sub in self.modules():
            if isinstance(sub, AdaIN1d):
                sub.fused = False
            if isinstance(sub, WeightNormMixin):
                sub.fold_weight_norm(None)
        pack = reduced == torch.bfloat16 and self.device.type == "cpu" and weight_packing_available()
        for sub in self.modules():
            if isinstance(sub, PackableLinear):
                sub.pack_weight(pack)  # ALBERT's float32 layers: same values up to the last bits, so not in fp32
        for sub in self.decoder.modules():
            if isinstance(sub, AdaIN1d):
                sub.fused = reduced is not None
            if isinstance(sub, WeightNormMixin):
                sub.fold_weight_norm(reduced)  # reduced-precision weights once, not a cast per call
                if pack:
                    sub.pack_weight()  # and in oneDNN's layout once, not a reorder per call
        for sub in self.decoder.generator.modules():
            if isinstance(sub, AdaINResBlock1):
                sub.use_int8(precision == "int8")  # its quantiser is eager until `compile_kernels`
        self.decoder.project_styles(reduced is not None)

    def compile_kernels(self, enabled: bool = True) -> bool:
        """Run the decoder's fused AdaIN + Snake work through `torch.compile` (see rt_server/model/kernels.py),
        or back through eager kernels. Only reduced precision uses these kernels.

        Compiles now, on a single utterance and a padded pair, so that no request pays for it (about a minute
        on a 2-core CPU the first time; Inductor caches its code on disk). Returns whether compiled kernels
        are in use: False for fp32, and False (eager kept, reason logged) where Inductor cannot run.
        `set_precision` (also run by `load_weights`) goes back to eager kernels: call this again after it.
        """
        kernel: AdainAct = adain_act_eager
        if enabled and self.precision != "fp32":
            try:
                kernel = compiled_adain_act()
                self._set_kernel(kernel)
                self._warm_kernels()
                if any(m.kernel is not kernel for m in self.decoder.modules() if isinstance(m, AdaIN1d)) or any(
                    m.quantize is quantize_u8 for m in self.decoder.modules() if isinstance(m, AdaINResBlock1)
                ):
                    raise RuntimeError("a compiled kernel failed while warming up (logged above)")
            except Exception as exc:  # no C++ compiler, unsupported platform: serve eagerly rather than not at all
                log.warning("compiled kernels unavailable, using eager ones: %s: %s", type(exc).__name__, exc)
                kernel = adain_act_eager
        self._set_kernel(kernel)
        return kernel is not adain_act_eager

    def _set_kernel(self, kernel: AdainAct) -> None:
        quantize = quantize_u8 if kernel is adain_act_eager else compiled_quantize_u8()
        for sub in self.decoder.modules():
            if isinstance(sub, AdaIN1d):
                sub.kernel = kernel
            if isinstance(sub, AdaINResBlock1):
                sub.quantize = quantize

    @torch.inference_mode()
    def _warm_kernels(self) -> None:
        style = torch.zeros(self.config.style_dim * 2)
        symbol = next(iter(self.vocab))
        short, longer = (self.item(symbol * n, style, noise=False) for n in (2, 40))
        self.forward_batch([short])
        self.forward_batch([short, longer])  # masked kernels
        self.forward_batch([short, short])  # a batch of more than one, unpadded
        # Single windows of several lengths, padded to their buckets or not: Inductor's first graphs guard on
        # the sizes they met, and a length the server meets later would otherwise compile anew mid-request.
        self.warm_lengths([short, longer], _WARM_WINDOW_FRAMES)

    @torch.inference_mode()
    def warm_lengths(self, items: Sequence[BatchItem], frames: Iterable[int]) -> None:
        """Build the kernels for these lengths before a request meets them (per bucket, see `bucket_length`):
        the front over each item alone (its tokens' length) and, with `bucket_lengths`, over the shortest item
        padded to each of `frames`; the generator over a window of each of `frames` (at most the longest
        item's frames)."""
        prepared = [self._prepare([item]) for item in items]
        longest = max(prepared, key=lambda p: int(p.geo.frames[0]))
        shortest = min(range(len(items)), key=lambda i: int(prepared[i].geo.frames[0]))
        total = int(longest.geo.frames[0])
        for n in frames:
            if self.bucket_lengths:
                self._prepare([items[shortest]], min_frames=n)
            self._render(longest, [(0, max(1, min(n, total)))])

    @property
    def device(self) -> torch.device:
        return self.bert_encoder.weight.device

    # ---- weights ---------------------------------------------------------------------------------------

    def load_weights(self, checkpoint: Checkpoint) -> None:
        """Load the five sections strictly: every checkpoint tensor must land on a parameter of the same shape,
        and every parameter must be filled, except the InstanceNorm affine pairs the published file lacks
        (they are set to identity: weight 1, bias 0). Raises `CheckpointError` naming what is wrong."""
        problems: list[str] = []
        for section in SECTIONS:
            module: nn.Module = getattr(self, section)
            given = {k: v for k, v in checkpoint[section].items() if k not in _IGNORED_KEYS.get(section, set())}
            expected = module.state_dict()
            optional = {
                f"{name}.{p}"
                for name, sub in module.named_modules()
                if isinstance(sub, InstanceNormAffine)
                for p in ("weight", "bias")
            }
            missing = sorted(k for k in expected if k not in given and k not in optional)
            unexpected = sorted(k for k in given if k not in expected)
            shapes = sorted(
                f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}"
                for k in given
                if k in expected and given[k].shape != expected[k].shape
            )
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
                if keys:
                    shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                    problems.append(f"{section}: {len(keys)} {label}: {shown}")
        if problems:
            raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
        with torch.no_grad():
            for section in SECTIONS:
                module = getattr(self, section)
                for sub in module.modules():
                    if isinstance(sub, InstanceNormAffine):
                        sub.weight.fill_(1.0)
                        sub.bias.fill_(0.0)
                given = {k: v for k, v in checkpoint[section].items() if k not in _IGNORED_KEYS.get(section, set())}
                module.load_state_dict(given, strict=False)
        self.fold_weight_norm()

    def export_weights(self) -> Checkpoint:
        """The model's weights as published-format sections (without the identity InstanceNorm affines)."""
        out: Checkpoint = {}
        for section in SECTIONS:
            module: nn.Module = getattr(self, section)
            skip = {
                f"{name}.{p}"
                for name, sub in module.named_modules()
                if isinstance(sub, InstanceNormAffine)
                for p in ("weight", "bias")
            }
            out[section] = {k: v.detach().cpu() for k, v in module.state_dict().items() if k not in skip}
        return out

    def fold_weight_norm(self) -> None:
        """Cache every weight-normed layer's `g * v / ||v||` (recomputed by `load_weights`), in the working
        precision's dtype."""
        self.set_precision(self.precision)

    # ---- tokens ----------------------------------------------------------------------------------------

    def unknown_symbols(self, phonemes: str) -> list[str]:
        """Symbols of `phonemes` outside the vocabulary, unique, in order of first appearance."""
        return list(dict.fromkeys(c for c in phonemes if c not in self.vocab))

    def tokenize(self, phonemes: str) -> list[int]:
        """Token ids with the two boundary tokens. Unknown symbols and over-long input are errors, not dropped."""
        unknown = self.unknown_symbols(phonemes)
        if unknown:
            names = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown)
            raise PhonemeError(f"phonemes outside the vocabulary: {names}", unknown)
        if not phonemes:
            raise PhonemeError("phoneme string is empty")
        if len(phonemes) > self.max_phonemes:
            raise PhonemeError(
                f"{len(phonemes)} phonemes exceed the model's limit of {self.max_phonemes} per utterance"
            )
        return [PAD_TOKEN_ID, *(self.vocab[c] for c in phonemes), PAD_TOKEN_ID]

    # ---- forward ---------------------------------------------------------------------------------------

    def forward(
        self,
        phonemes: str,
        ref_s: Tensor,
        speed: float = 1.0,
        *,
        noise: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Synthesise one utterance: 24 kHz float32 audio on the CPU, 600 samples per duration frame."""
        return self.forward_batch([self.item(phonemes, ref_s, speed, noise=noise, generator=generator)])[0].audio

    def forward_with_tokens(
        self,
        input_ids: Tensor,
        ref_s: Tensor,
        speed: float = 1.0,
        *,
        noise: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """input_ids [1, T] (boundary tokens included), ref_s [1, 256]. Returns (audio [600F], pred_dur [T])."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("forward_with_tokens takes one utterance [1, T]; use forward_batch for more")
        item = BatchItem(input_ids[0], ref_s.reshape(-1), speed, noise, generator)
        out = self.forward_batch([item])[0]
        return out.audio, out.pred_dur

    def item(
        self,
        phonemes: str,
        ref_s: Tensor,
        speed: float = 1.0,
        *,
        noise: bool = True,
        generator: torch.Generator | None = None,
        max_lead_frames: int | None = None,
        max_trail_frames: int | None = None,
    ) -> BatchItem:
        """A `BatchItem` from phonemes (validated like `forward`)."""
        ids = torch.tensor(self.tokenize(phonemes), dtype=torch.long)
        return BatchItem(ids, ref_s.reshape(-1), speed, noise, generator, max_lead_frames, max_trail_frames)

    @torch.inference_mode()
    def prime(self, item: BatchItem, interrupt: Callable[[], bool] | None = None) -> bool:
        """Run the front (everything before the generator) over `item` and drop the result; stop between its
        parts once `interrupt()` is true. Returns whether it ran to the end. On a CPU that sat idle for a few
        hundred milliseconds, the next request's front ran at half speed or less (a first segment's 95 ms took
        210-280 ms after 5 s idle); a front over two words just before it brought it back to full speed
        (docs/performance.md, "A cold start after idle")."""
        try:
            self._prepare([item], interrupt=interrupt)
        except _InterruptedError:
            return False
        return True

    @torch.inference_mode()
    def forward_batch(self, items: Sequence[BatchItem]) -> list[BatchOutput]:
        """Synthesise several utterances in one pass; each output equals the item's single run (see module doc)."""
        if not items:
            return []
        prepared = self._prepare(items)
        windows = [(0, int(dur.sum())) for dur in prepared.pred_dur]
        audio = self._render(prepared, windows)
        return [
            _trim_boundaries(a, dur.clone(), it, w)
            for a, dur, it, w in zip(audio, prepared.pred_dur, items, windows, strict=True)
        ]

    @torch.inference_mode()
    def stream_batch(
        self, items: Sequence[BatchItem], first_frames: Sequence[int | None], *, first_share: float = 1 / 3
    ) -> Iterator[list[Chunk]]:
        """`forward_batch` in two windows of the generator, so that an item's first audio is out after a
        fraction of the work. Yields twice, a list with one `Chunk` per item each time: first the opening of
        every item that asked for one (`first_frames[i]` frames, or `first_share` of the item's audio if that
        is more; an empty chunk for the others), then the rest of every item (all of it for those not split).

        An item is split only where the rest is longer than `GENERATOR_CONTEXT_FRAMES`: the first window runs from
        the item's start to `GENERATOR_CONTEXT_FRAMES` past the split, the second from as far before it to the
        item's end, and the second fades in over the first across `_SEAM_SAMPLES`. Each window's AdaIN layers
        normalise over its own frames, so the audio is close to, not equal to, `forward_batch`'s: measured
        with the real weights on the first segments of the intelligibility tier, 1.4-1.8 dB quieter on average
        (0.9-2.5 dB; a shorter window is quieter), log-mel correlation 0.988-0.993, word error rate unchanged
        (tests/test_intelligibility.py). The windows keep the item's whole boundary silence for that reason:
        cropping it too made the opening 3.3 dB quieter. The server sizes `first_share` by the model's measured
        speed, so that the rest is ready before the opening has played (`ModelRunner.opening_share`).
        """
        if not items:
            return
        prepared = self._prepare(items)
        context = GENERATOR_CONTEXT_FRAMES
        kept = [_kept_window(it, dur) for it, dur in zip(items, prepared.pred_dur, strict=True)]
        frames = [int(dur.sum()) for dur in prepared.pred_dur]
        cuts: list[int | None] = []  # the split, in the item's frames
        for (k0, k1), n in zip(kept, first_frames, strict=True):
            opening = None if n is None else max(n, math.ceil((k1 - k0) * first_share))
            if opening is not None and self.bucket_lengths:  # the first window fills its bucket with audio
                opening = bucket_length(k0 + opening + context) - k0 - context
            cuts.append(None if opening is None or k1 - k0 - opening <= context else k0 + opening)
        first = [(0, f if c is None else c + context) for f, c in zip(frames, cuts, strict=True)]
        audio = self._render(prepared, first)
        outputs = [
            _trim_boundaries(a, dur.clone(), it, w)
            for a, dur, it, w in zip(audio, prepared.pred_dur, items, first, strict=True)
        ]
        total = [int(out.pred_dur.sum()) * SAMPLES_PER_FRAME for out in outputs]
        splits = [None if c is None else (c - k0) * SAMPLES_PER_FRAME for c, (k0, _) in zip(cuts, kept, strict=True)]
        yield [
            Chunk(out.audio[: split or 0].clone(), out.pred_dur, 0, n)
            for out, split, n in zip(outputs, splits, total, strict=True)
        ]
        rest = [i for i, c in enumerate(cuts) if c is not None]
        chunks = [Chunk(out.audio, out.pred_dur, 0, n) for out, n in zip(outputs, total, strict=True)]
        if rest:
            second = [(max(0, cuts[i] - context), frames[i]) for i in rest]  # type: ignore[operator]
            audio = self._render(prepared, second, rest)
            ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0.0, torch.pi, _SEAM_SAMPLES))
            for j, i in enumerate(rest):
                split, cut = splits[i], cuts[i]
                assert split is not None and cut is not None
                out = _trim_boundaries(audio[j], prepared.pred_dur[i].clone(), items[i], second[j])
                tail = out.audio[(cut - max(kept[i][0], second[j][0])) * SAMPLES_PER_FRAME :].clone()  # split on
                before = outputs[i].audio[split : split + _SEAM_SAMPLES]  # the first window's overlap
                tail[: len(before)] = before * ramp.flip(0)[: len(before)] + tail[: len(before)] * ramp[: len(before)]
                chunks[i] = Chunk(tail, out.pred_dur, split, total[i])
        yield chunks

    def _prepare(
        self, items: Sequence[BatchItem], min_frames: int = 1, interrupt: Callable[[], bool] | None = None
    ) -> _Prepared:
        """Everything before the generator: durations, F0 and energy, the decoder's features and the sine
        source, for the whole of every item; with `bucket_lengths`, tokens and frames padded to their buckets
        (frames to at least `min_frames`: the warm-up's way of building a bucket's kernels). Raises
        `_InterruptedError` between its parts once `interrupt()` is true (`prime`)."""
        device = self.device
        lengths_list = [int(it.input_ids.shape[0]) for it in items]
        if min(lengths_list) < 2 or max(lengths_list) > self.max_phonemes + 2:
            raise ValueError(f"input_ids must hold 2..{self.max_phonemes + 2} tokens incl. the boundaries")
        B, T = len(items), max(lengths_list)
        if self.bucket_lengths:
            T = bucket_length(T)
        ids = torch.full((B, T), PAD_TOKEN_ID, dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, : lengths_list[i]] = it.input_ids.to(torch.long).cpu()
        ids = ids.to(device)
        ref_s = torch.stack([it.ref_s.reshape(-1).float() for it in items]).to(device)
        speed = torch.tensor([float(it.speed) for it in items], device=device)
        token_padded = len(set(lengths_list)) > 1 or max(lengths_list) < T
        lengths = torch.tensor(lengths_list, device=device) if token_padded else None
        tmask = sequence_mask(lengths, T) if lengths is not None else None
        style_dim = self.config.style_dim
        s_acoustic, s_prosody = ref_s[:, :style_dim], ref_s[:, style_dim:]

        bert_dur = self.bert(ids, lengths, None if interrupt is None else partial(_stop_if, interrupt))
        d_en = self.bert_encoder(bert_dur).transpose(-1, -2)
        _stop_if(interrupt)
        d = self.predictor.text_encoder(d_en, s_prosody, lengths, tmask)
        _stop_if(interrupt)
        duration = self.predictor.durations(d, speed, lengths).float()
        pred_dur = torch.round(duration).clamp(min=1).long()
        if tmask is not None:
            pred_dur = pred_dur * tmask[:, 0].long()
        frames = pred_dur.sum(dim=1)
        F_max = int(frames.max())
        if self.bucket_lengths:
            F_max = bucket_length(max(F_max, min_frames))
        geo = self._geometry(frames, F_max)
        ends = torch.cumsum(pred_dur, dim=1)
        frame_idx = torch.arange(F_max, device=device)[None, :].expand(B, -1).contiguous()
        frame_tokens = torch.searchsorted(ends, frame_idx, right=True).clamp(max=T - 1)
        fmask = geo.mask(1, F_max)
        en = apply_mask(expand_to_frames(d.transpose(1, 2), frame_tokens), fmask)
        _stop_if(interrupt)
        f0, n = self.predictor.f0_energy(en, s_prosody, frames if geo.padded else None, fmask, geo.mask(2, 2 * F_max))
        _stop_if(interrupt)
        t_en = self.text_encoder(ids, lengths, tmask)
        _stop_if(interrupt)
        asr = apply_mask(expand_to_frames(t_en, frame_tokens), fmask)
        noise = [self._draw_noise(it, int(f)) for it, f in zip(items, frames.tolist(), strict=True)]
        # Reduced precision covers the decoder only, where nearly all the compute is (frame and sample rate).
        # Durations and the F0 and energy curves stay float32: the timing is then exactly the fp32 model's, and
        # the sine source follows an F0 with float32 resolution (bf16 would quantise 200 Hz to about 1 Hz).
        with self._reduced():
            styles = self.decoder.style_affines(s_acoustic)
            x = self.decoder.features(asr, f0.float(), n.float(), styles, geo)
            _stop_if(interrupt)
            har = self.decoder.generator.harmonic_source(f0.float(), geo, noise).to(x.dtype)
        pred_dur = pred_dur.cpu()
        return _Prepared(x, har, styles, geo, [pred_dur[i, :n_tok] for i, n_tok in enumerate(lengths_list)])

    def _render(
        self, prepared: _Prepared, windows: Sequence[tuple[int, int]], rows: Sequence[int] | None = None
    ) -> list[Tensor]:
        """The generator over duration frames [a_j, b_j) of prepared item `rows[j]` (default: every item, in
        order): float32 audio on the CPU, 600 samples a frame. Whole items run on the prepared batch as it is;
        windows are cut out and batched anew (each window is then normalised over its own frames)."""
        frames = prepared.geo.frames.tolist()
        rows = range(len(frames)) if rows is None else rows
        whole = [(0, f) for f in frames]
        spans = [b - a for a, b in windows]
        F_max = bucket_length(max(spans)) if self.bucket_lengths else max(spans)
        if list(rows) == list(range(len(frames))) and list(windows) == whole and 2 * F_max == prepared.x.shape[-1]:
            x, har, s, geo = prepared.x, prepared.har, prepared.s, prepared.geo
        else:
            geo = self._geometry(torch.tensor(spans, device=prepared.x.device), F_max)
            B = len(spans)
            per_frame = SAMPLES_PER_FRAME // self.config.istftnet.gen_istft_hop_size  # STFT frames
            x = prepared.x.new_zeros(B, prepared.x.shape[1], 2 * F_max)
            har = prepared.har.new_zeros(B, prepared.har.shape[1], per_frame * F_max + 1)
            for j, (row, (a, b)) in enumerate(zip(rows, windows, strict=True)):
                x[j, :, : 2 * (b - a)] = prepared.x[row, :, 2 * a : 2 * b]
                har[j, :, : per_frame * (b - a) + 1] = prepared.har[row, :, per_frame * a : per_frame * b + 1]
            s = prepared.s.rows(rows) if isinstance(prepared.s, StyleAffines) else prepared.s[list(rows)]
        with self._reduced():
            audio = self.decoder.generator.synthesize(x, s, har, geo)
        audio = audio.float().cpu()
        return [audio[i, : (b - a) * SAMPLES_PER_FRAME] for i, (a, b) in enumerate(windows)]

    def _geometry(self, frames: Tensor, length: int | None = None) -> FrameGeometry:
        """Items of `frames` duration frames, in tensors `length` frames long (default: the longest item's)."""
        lengths = frames.tolist()
        return FrameGeometry(
            frames=frames,
            n_fft=self.config.istftnet.gen_istft_n_fft,
            hop=self.config.istftnet.gen_istft_hop_size,
            upsample_rates=self.config.istftnet.upsample_rates,
            padded=len(set(lengths)) > 1 or (length is not None and length > max(lengths)),
        )

    def _reduced(self) -> AbstractContextManager[object]:
        dtype = PRECISIONS[self.precision]
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @staticmethod
    def _draw_noise(item: BatchItem, frames: int) -> Tensor | None:
        """The reference's draws: `rand(1, 9)` (the unused initial phase), then standard normals laid out as
        the transposed [1, 9, L] view `randn_like` sees. Drawn on the CPU for device-independent results."""
        if not item.noise:
            return None
        n = HARMONIC_NUM + 1
        gen = item.generator
        torch.rand(1, n, generator=gen)
        samples = frames * SAMPLES_PER_FRAME
        draw = torch.empty(1, n, samples).transpose(1, 2).normal_(generator=gen)
        return draw[0]


class _InterruptedError(Exception):
    """`_prepare` stopped between its parts because its caller asked it to (`KModel.prime`)."""


def _stop_if(interrupt: Callable[[], bool] | None) -> None:
    if interrupt is not None and interrupt():
        raise _InterruptedError


def _kept_window(item: BatchItem, pred_dur: Tensor) -> tuple[int, int]:
    """The duration frames [k0, k1) of the item's audio that `_trim_boundaries` keeps."""
    frames = int(pred_dur.sum())
    lead = 0 if item.max_lead_frames is None else max(0, int(pred_dur[0]) - max(1, item.max_lead_frames))
    trail = 0 if item.max_trail_frames is None else max(0, int(pred_dur[-1]) - max(1, item.max_trail_frames))
    return lead, frames - trail


def _trim_boundaries(audio: Tensor, pred_dur: Tensor, item: BatchItem, window: tuple[int, int]) -> BatchOutput:
    """Cut the boundary tokens' silence down to the item's caps (see `BatchItem`). `audio` holds the item's
    duration frames `window` = [a, b); what is returned is the part of it inside the kept frames.

    The model runs with its own boundary durations: shortening them before the decoder garbles the first and
    last words (the decoder and the F0 and energy predictors take their onset from those frames; measured as
    a word error rate of 15-30 % against 0 % with Whisper on the intelligibility tier), and sparing the
    generator most of it made the audio 1.3 dB quieter (its AdaIN layers normalise over the frames they see).
    The cut falls in the boundary token's near-silence; a 5 ms raised-cosine fade at each cut keeps it
    click-free. `pred_dur` is changed to match the kept frames.
    """
    frames = int(pred_dur.sum())
    k0, k1 = _kept_window(item, pred_dur)
    a, b = window
    pred_dur[0] -= k0
    pred_dur[-1] -= frames - k1
    start, end = max(k0, a), min(k1, b)
    out = audio[(start - a) * SAMPLES_PER_FRAME : (end - a) * SAMPLES_PER_FRAME].clone()
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0.0, torch.pi, _FADE_SAMPLES))
    if k0 and start == k0:
        out[:_FADE_SAMPLES] *= ramp
    if k1 < frames and end == k1:
        out[-_FADE_SAMPLES:] *= ramp.flip(0)
    return BatchOutput(out, pred_dur)
