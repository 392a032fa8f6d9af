"""Generator length buckets: under reduced precision on a CPU the generator runs on a few padded lengths
(`bucket_length`), so oneDNN builds its kernels for a few dozen lengths instead of one set per segment; the
padding is masked, so every item computes what it computes unpadded (tiny model, random weights)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from rt_server.model.config import SAMPLES_PER_FRAME
from rt_server.model.istftnet import FrameGeometry
from rt_server.model.kmodel import GENERATOR_CONTEXT_FRAMES, BatchItem, KModel, bucket_length
from rt_server.model.runner import WARMUP_WINDOW_FRAMES, SynthesisRequest, tiny_model, tiny_runner

PHONEMES = ("ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˌOvəɹ ðə lˈAzi dˈɔɡ", "hˈɛlO wˈɜɹld", "ɐ")


def test_buckets_are_few_and_waste_at_most_an_eighth() -> None:
    buckets = [bucket_length(n) for n in range(1, 2049)]
    for n, b in enumerate(buckets, start=1):
        assert b >= n and b % 8 == 0
        assert b - n < max(8, n / 8), f"{n} frames padded to {b}"
    assert buckets == sorted(buckets)  # longer never pads shorter
    assert bucket_length(bucket_length(37)) == bucket_length(37) == 40  # a bucket is its own bucket
    assert len(set(buckets[:128])) == 16  # every 8 frames (200 ms) up to 3.2 s
    assert len(set(buckets)) == 16 + 8 * 4  # then eight per doubling up to 51 s
    with pytest.raises(ValueError, match="must be at least 1"):
        bucket_length(0)


def test_buckets_are_on_for_reduced_precision_on_the_cpu_only() -> None:
    model = tiny_model(seed=0)
    assert model.bucket_lengths is False  # fp32: the reference's exact, unpadded path
    model.set_precision("bf16")
    assert model.bucket_lengths is True
    model.set_precision("fp32")
    assert model.bucket_lengths is False


@pytest.fixture(scope="module")
def model() -> KModel:
    model = tiny_model(seed=0)
    model.set_precision("bf16")
    return model


def _items(model: KModel, speed: float = 1.0) -> list[BatchItem]:
    style = torch.randn(256, generator=torch.Generator().manual_seed(1)) * 0.15
    return [model.item(p, style, speed, noise=False) for p in PHONEMES]


@pytest.fixture
def generator_lengths(model: KModel, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    """Per generator call: the length its tensors have (frames) and each item's own frames."""
    calls: list[tuple[int, list[int]]] = []
    generator = model.decoder.generator
    synthesize = generator.synthesize

    def spy(x: torch.Tensor, s: torch.Tensor, har: torch.Tensor, geo: FrameGeometry) -> torch.Tensor:
        calls.append((x.shape[-1] // 2, [int(f) for f in geo.frames]))
        return synthesize(x, s, har, geo)

    monkeypatch.setattr(generator, "synthesize", spy)
    return calls


@pytest.mark.parametrize(("precision", "bound"), [("fp32", 0.005), ("bf16", 0.05)])
def test_padded_to_buckets_each_item_computes_what_it_computes_unpadded(
    model: KModel, generator_lengths: list[tuple[int, list[int]]], precision: str, bound: float
) -> None:
    """As for a padded batch (tests/test_model_batch.py): durations equal, audio within the bound of its peak
    (float summation orders differ, and the sine source integrates F0 over the item). fp32 does not bucket on
    its own; switched on here, it shows the padding is masked, not just that bf16 is noisy."""
    model.set_precision(precision)
    items = _items(model)
    try:
        model.bucket_lengths = False
        plain = [model.forward_batch([item])[0] for item in items]
        model.bucket_lengths = True
        generator_lengths.clear()
        bucketed = [model.forward_batch([item])[0] for item in items]
    finally:
        model.set_precision("bf16")
    frames = [int(out.pred_dur.sum()) for out in plain]
    assert generator_lengths == [(bucket_length(f), [f]) for f in frames]
    assert any(bucket_length(f) > f for f in frames), "every item fills its bucket exactly: change the phonemes"
    for a, b in zip(plain, bucketed, strict=True):
        assert torch.equal(a.pred_dur, b.pred_dur)
        assert len(a.audio) == len(b.audio)
        error = float((a.audio - b.audio).abs().max()) / float(a.audio.abs().max())
        assert error < bound, f"padded to buckets, the audio differs by {100 * error:.2f} % of its peak"


def test_a_padded_batch_is_padded_to_its_longest_items_bucket(
    model: KModel, generator_lengths: list[tuple[int, list[int]]]
) -> None:
    items = _items(model)
    singles = [model.forward_batch([item])[0] for item in items]
    frames = [int(out.pred_dur.sum()) for out in singles]
    generator_lengths.clear()
    batch = model.forward_batch(items)
    assert generator_lengths == [(bucket_length(max(frames)), frames)]
    for single, batched in zip(singles, batch, strict=True):
        assert torch.equal(single.pred_dur, batched.pred_dur)


def test_the_front_runs_on_bucketed_tokens_and_frames(model: KModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """ALBERT, the predictor and the decoder's blocks see the item's tokens and frames padded to their buckets
    (masked, as in a padded batch), so a new segment length meets kernels already built."""
    token_lengths: list[int] = []
    bert = model.bert
    forward = bert.forward

    def spy(input_ids: torch.Tensor, lengths: torch.Tensor | None, after_layer: Any = None) -> torch.Tensor:
        token_lengths.append(input_ids.shape[1])
        return forward(input_ids, lengths, after_layer)

    monkeypatch.setattr(bert, "forward", spy)
    item = _items(model)[1]
    tokens = int(item.input_ids.shape[0])
    with torch.inference_mode():
        prepared = model._prepare([item])
        frames = int(prepared.geo.frames[0])
        assert token_lengths == [bucket_length(tokens)] and bucket_length(tokens) > tokens
        assert prepared.x.shape[-1] == 2 * bucket_length(frames)
        assert prepared.har.shape[-1] == 120 * bucket_length(frames) + 1
        longer = model._prepare([item], min_frames=frames + 50)  # the warm-up's way to build a longer bucket
        assert longer.x.shape[-1] == 2 * bucket_length(frames + 50)
        assert torch.equal(longer.pred_dur[0], prepared.pred_dur[0])
        model.bucket_lengths = False
        try:
            plain = model._prepare([item])
        finally:
            model.bucket_lengths = True
    assert token_lengths[-1] == tokens and plain.x.shape[-1] == 2 * frames
    assert torch.equal(plain.pred_dur[0], prepared.pred_dur[0])


def test_a_split_items_first_window_fills_its_bucket_with_audio(
    model: KModel, generator_lengths: list[tuple[int, list[int]]]
) -> None:
    """The opening is made long enough that the first window is exactly a bucket: no padding is computed for
    the listener's first audio, and the opening is at least what was asked for."""
    item = _items(model, speed=0.4)[0]  # slower: long enough to split
    frames = int(model.forward_batch([item])[0].pred_dur.sum())
    generator_lengths.clear()
    (opening,), (rest,) = model.stream_batch([item], [3], first_share=0.1)
    n = len(opening.audio) // SAMPLES_PER_FRAME
    first_window = n + GENERATOR_CONTEXT_FRAMES
    assert n >= max(3, math.ceil(frames * 0.1))
    assert generator_lengths[0] == (first_window, [first_window]) == (bucket_length(first_window), [first_window])
    second = frames - (n - GENERATOR_CONTEXT_FRAMES)
    assert generator_lengths[1] == (bucket_length(second), [second])
    assert rest.offset == len(opening.audio) and rest.offset + len(rest.audio) == rest.total_samples


def test_warm_up_builds_the_first_windows_buckets() -> None:
    runner = tiny_runner(seed=0)
    runner.model.set_precision("bf16")
    lengths: list[int] = []
    generator = runner.model.decoder.generator
    synthesize = generator.synthesize

    def spy(x: torch.Tensor, s: torch.Tensor, har: torch.Tensor, geo: FrameGeometry) -> torch.Tensor:
        lengths.append(x.shape[-1] // 2)
        return synthesize(x, s, har, geo)

    generator.synthesize = spy  # type: ignore[method-assign]
    runner.warmup()
    sentence_frames = max(lengths)  # the warm-up sentence's whole pass is the longest
    expected = {bucket_length(min(n, sentence_frames)) for n in WARMUP_WINDOW_FRAMES}
    assert expected <= set(lengths)
    assert len(expected) > 4
    # and serving then meets those lengths: a request reuses what warm-up built
    lengths.clear()
    runner.synthesize([SynthesisRequest(PHONEMES[1], "af_test")])
    assert set(lengths) <= expected | {bucket_length(sentence_frames)}
