"""Generator length buckets: under reduced precision on a CPU the generator runs on a few padded lengths
(`bucket_frames`), so oneDNN builds its kernels for a few dozen lengths instead of one set per segment; the
padding is masked, so every item computes what it computes unpadded (tiny model, random weights)."""

from __future__ import annotations

import math

import pytest
import torch

from rt_server.model.config import SAMPLES_PER_FRAME
from rt_server.model.istftnet import FrameGeometry
from rt_server.model.kmodel import GENERATOR_CONTEXT_FRAMES, BatchItem, KModel, bucket_frames
from rt_server.model.runner import WARMUP_WINDOW_FRAMES, SynthesisRequest, tiny_model, tiny_runner

PHONEMES = ("ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˌOvəɹ ðə lˈAzi dˈɔɡ", "hˈɛlO wˈɜɹld", "ɐ")


def test_buckets_are_few_and_waste_at_most_an_eighth() -> None:
    buckets = [bucket_frames(n) for n in range(1, 2049)]
    for n, b in enumerate(buckets, start=1):
        assert b >= n and b % 8 == 0
        assert b - n < max(8, n / 8), f"{n} frames padded to {b}"
    assert buckets == sorted(buckets)  # longer never pads shorter
    assert bucket_frames(bucket_frames(37)) == bucket_frames(37) == 40  # a bucket is its own bucket
    assert len(set(buckets[:128])) == 16  # every 8 frames (200 ms) up to 3.2 s
    assert len(set(buckets)) == 16 + 8 * 4  # then eight per doubling up to 51 s
    with pytest.raises(ValueError, match="at least one frame"):
        bucket_frames(0)


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


def test_padded_to_a_bucket_each_item_computes_what_it_computes_unpadded(
    model: KModel, generator_lengths: list[tuple[int, list[int]]]
) -> None:
    items = _items(model)
    model.bucket_lengths = False
    try:
        plain = [model.forward_batch([item])[0] for item in items]
    finally:
        model.bucket_lengths = True
    generator_lengths.clear()
    bucketed = [model.forward_batch([item])[0] for item in items]
    frames = [int(out.pred_dur.sum()) for out in plain]
    assert generator_lengths == [(bucket_frames(f), [f]) for f in frames]
    assert any(bucket_frames(f) > f for f in frames), "every item fills its bucket exactly: change the phonemes"
    for a, b in zip(plain, bucketed, strict=True):
        assert torch.equal(a.pred_dur, b.pred_dur)
        assert len(a.audio) == len(b.audio)
        error = float((a.audio - b.audio).abs().max()) / float(a.audio.abs().max())
        assert error < 0.02, f"padded to a bucket, the audio differs by {100 * error:.2f} % of its peak"
    batch = model.forward_batch(items)  # a padded batch is padded to the bucket of its longest item
    assert generator_lengths[-1] == (bucket_frames(max(frames)), frames)
    for single, batched in zip(bucketed, batch, strict=True):
        assert torch.equal(single.pred_dur, batched.pred_dur)


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
    assert generator_lengths[0] == (first_window, [first_window]) == (bucket_frames(first_window), [first_window])
    second = frames - (n - GENERATOR_CONTEXT_FRAMES)
    assert generator_lengths[1] == (bucket_frames(second), [second])
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
    expected = {bucket_frames(min(n, sentence_frames)) for n in WARMUP_WINDOW_FRAMES}
    assert expected <= set(lengths)
    assert len(expected) > 4
    # and serving then meets those lengths: a request reuses what warm-up built
    lengths.clear()
    runner.synthesize([SynthesisRequest(PHONEMES[1], "af_test")])
    assert set(lengths) <= expected | {bucket_frames(sentence_frames)}
