"""Generator windows: `forward_batch` spares the generator most of a cut boundary silence, and `stream_batch`
delivers an item's opening before the rest (tiny model, random weights; quality with the real weights is in
tests/test_intelligibility.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from rt_server.model.config import SAMPLES_PER_FRAME, load_config
from rt_server.model.istftnet import FrameGeometry
from rt_server.model.kmodel import _SEAM_SAMPLES, GENERATOR_CONTEXT_FRAMES, BatchItem, Chunk, KModel
from rt_server.model.runner import tiny_model

SLOW = 0.4  # the tiny model's boundary durations are 4 frames at speed 1: slower, they are long enough to cut
PHONEMES = ("ðə kwˈɪk bɹˈWn fˈɑks", "hˈɛlO", "ʤˈʌmps ˌOvəɹ ðə lˈAzi dˈɔɡ ænd ðə kˈæt")


@pytest.fixture(scope="module")
def model() -> KModel:
    return tiny_model(seed=0)


def _items(model: KModel, caps: tuple[int | None, int | None] = (None, None), speed: float = 1.0) -> list[BatchItem]:
    style = torch.randn(256, generator=torch.Generator().manual_seed(1)) * 0.15
    return [
        model.item(p, style, speed, noise=False, max_lead_frames=caps[0], max_trail_frames=caps[1]) for p in PHONEMES
    ]


def _stream(model: KModel, items: list[BatchItem], first: list[int | None]) -> tuple[list[Chunk], list[Chunk]]:
    windows = list(model.stream_batch(items, first))
    assert len(windows) == 2, "stream_batch yields the openings, then the rest"
    return windows[0], windows[1]


def test_generator_context_covers_the_generators_reach() -> None:
    """The context a window runs beyond its audio covers how far the generator's convolutions reach (one side,
    in 24 kHz samples, from the published config), plus the seam where the second window fades in, so edge
    effects stay in the discarded context. Two paths reach an output sample: the decoder features through the
    transposed convolutions and residual blocks, and the sine source's STFT through the noise convolution and
    its residual block, which joins each stage before that stage's residual blocks."""
    cfg = load_config(None).istftnet
    hop = cfg.gen_istft_hop_size  # samples per source STFT frame

    def block(kernel: int, dilations: Sequence[int]) -> float:  # one AdaINResBlock1, in positions
        return sum((kernel - 1) * d / 2 + (kernel - 1) / 2 for d in dilations)

    per_position = SAMPLES_PER_FRAME // 2  # the generator's input: 2 positions per duration frame
    reach = 0.0
    resblocks = list(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True))
    stages = list(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
    for i, (rate, kernel) in enumerate(stages):
        per_position //= rate
        last = i == len(stages) - 1
        stride = math.prod(cfg.upsample_rates[i + 1 :])
        noise_conv = 0.5 if last else stride  # kernel 1, or 2 x stride over the STFT frames
        source = noise_conv * hop + block(11 if last else 7, (1, 3, 5)) * per_position
        reach = max(reach + kernel / 2 * per_position, source)
        reach += max(block(k, d) for k, d in resblocks) * per_position
    reach += 3 * per_position + cfg.gen_istft_n_fft / 2  # conv_post (kernel 7) and the inverse STFT
    assert per_position == hop
    budget = GENERATOR_CONTEXT_FRAMES * SAMPLES_PER_FRAME - _SEAM_SAMPLES
    assert reach <= budget, f"reach {reach:.0f} samples, context less the seam {budget}"
    assert reach > budget - SAMPLES_PER_FRAME  # and not a frame more than needed


@pytest.fixture
def generator_calls(model: KModel, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The frames of each item in each call of the generator (observed, the call goes through)."""
    calls: list[list[int]] = []
    generator = model.decoder.generator
    synthesize = generator.synthesize

    def spy(x: torch.Tensor, s: torch.Tensor, har: torch.Tensor, geo: FrameGeometry) -> torch.Tensor:
        calls.append([int(f) for f in geo.frames])
        return synthesize(x, s, har, geo)

    monkeypatch.setattr(generator, "synthesize", spy)
    return calls


def test_forward_batch_runs_the_generator_on_whole_items(model: KModel, generator_calls: list[list[int]]) -> None:
    """Cut boundary silence is still synthesised (cropping it made the audio quieter with the real weights,
    see `_trim_boundaries`): one generator call over every item's whole frames, then the cut."""
    whole = model.forward_batch(_items(model, speed=SLOW))
    cut = model.forward_batch(_items(model, (1, 1), speed=SLOW))
    assert generator_calls == [[int(w.pred_dur.sum()) for w in whole]] * 2
    for full, out in zip(whole, cut, strict=True):
        assert int(out.pred_dur[0]) == int(out.pred_dur[-1]) == 1
        assert torch.equal(out.pred_dur[1:-1], full.pred_dur[1:-1])
        assert len(out.audio) == SAMPLES_PER_FRAME * int(out.pred_dur.sum())


@pytest.mark.parametrize("caps", [(None, None), (2, 2)])
def test_stream_parts_add_up_to_the_segment(model: KModel, caps: tuple[int | None, int | None]) -> None:
    items = _items(model, caps, speed=SLOW)
    reference = model.forward_batch(items)
    first: list[int | None] = [3, None, 1]
    openings, rests = _stream(model, items, first)
    for i, (ref, opening, rest) in enumerate(zip(reference, openings, rests, strict=True)):
        total = len(ref.audio)
        assert opening.total_samples == rest.total_samples == total
        assert torch.equal(opening.pred_dur, ref.pred_dur) and torch.equal(rest.pred_dur, ref.pred_dur)
        assert opening.offset == 0 and rest.offset == len(opening.audio)
        assert rest.offset + len(rest.audio) == total
        kept = total // SAMPLES_PER_FRAME
        requested = first[i]
        if requested is None:  # not asked for: nothing ahead, the whole audio after
            assert len(opening.audio) == 0
            torch.testing.assert_close(rest.audio, ref.audio, rtol=0, atol=1e-6)
            continue
        expected = max(requested, math.ceil(kept / 3))
        if kept - expected > GENERATOR_CONTEXT_FRAMES:
            assert len(opening.audio) == expected * SAMPLES_PER_FRAME
        else:  # too short to split: all of it in the second part
            assert len(opening.audio) == 0
    assert any(len(o.audio) for o in openings), "no item was split: make the phonemes longer"


@pytest.mark.parametrize(("first", "caps"), [(1, (2, 2)), (1, (None, None)), (2, (1000, 1000))])
def test_the_opening_needs_only_its_own_window(
    model: KModel, generator_calls: list[list[int]], first: int, caps: tuple[int | None, int | None]
) -> None:
    """One item (the CPU's batch size): the first generator call runs from the item's start to the context past
    the split, so the opening costs a fraction of the item; the second from the context before the split on."""
    item = _items(model, caps, speed=SLOW)[2]
    reference = model.forward_batch([item])[0]
    whole = model.forward_batch([_items(model, speed=SLOW)[2]])[0]
    lead = int(whole.pred_dur[0]) - int(reference.pred_dur[0])  # frames cut before the first phoneme
    frames, kept = int(whole.pred_dur.sum()), int(reference.pred_dur.sum())
    generator_calls.clear()
    (opening,), (rest,) = _stream(model, [item], [first])
    n = len(opening.audio) // SAMPLES_PER_FRAME
    cut, context = lead + n, GENERATOR_CONTEXT_FRAMES
    assert n == max(first, math.ceil(kept / 3))
    assert generator_calls == [[cut + context], [frames - max(0, cut - context)]]
    assert frames > 2 * (cut + context)  # the opening's window is well under half the item
    assert len(rest.audio) == SAMPLES_PER_FRAME * (kept - n)
    assert float(torch.cat([opening.audio, rest.audio]).abs().max()) < 1.0


def test_nothing_to_stream(model: KModel) -> None:
    assert list(model.stream_batch([], [])) == []


def test_the_runner_sizes_the_opening_by_its_measured_speed() -> None:
    """The opening grows with the runner's real-time factor r, so the rest (r times its audio) is ready before
    the opening has played half: f = r / (0.5 + r), between 0.1 and 0.5; a third before anything was measured."""
    from rt_server.model.runner import SynthesisRequest, tiny_runner

    runner = tiny_runner(seed=0)
    assert runner.rtf is None and runner.opening_share() == pytest.approx(1 / 3)
    for rtf, share in ((0.01, 0.1), (0.25, 1 / 3), (0.5, 0.5), (3.0, 0.5)):
        runner.rtf = rtf
        assert runner.opening_share() == pytest.approx(share)
    runner.rtf = 0.25  # unclamped: the rest's synthesis takes exactly half of the opening's playing time
    assert 0.25 * (1 - runner.opening_share()) == pytest.approx(0.5 * runner.opening_share())
    runner.rtf = None
    parts: list[object] = []
    request = SynthesisRequest("ʤˈʌmps ˌOvəɹ ðə lˈAzi dˈɔɡ", "af_test", 1.0, None, 2, 2, first_chunk_frames=1)
    rest = runner.synthesize([request], lambda _, part: parts.append(part))[0]
    assert runner.rtf is not None and runner.rtf > 0  # measured on that pass
    assert runner.rest_rtf is not None and runner.rest_rtf > 0  # and its second window, which it now goes by
    assert runner.opening_share() == pytest.approx(min(0.5, max(0.1, runner.rest_rtf / (0.5 + runner.rest_rtf))))
    assert len(parts) == 1 and rest.offset > 0
    assert rest.offset == 600 * math.ceil(rest.total_samples / 600 / 3)  # a third, before the measurement
