"""forward_batch: every item of a padded batch computes what it computes alone.

Bounds (docs/model.md): predicted durations are equal exactly. Audio agrees to within 5 % of the item's peak
(seen: 0.5 % for short items, 2 % late in a 510-phoneme item). It cannot agree to the last bit: batching changes
float summation orders in matmuls, packed LSTMs and masked norms (about 1e-7 relative), and the sine source
integrates F0 over the whole utterance, so a 1-ulp F0 difference becomes a phase drift that grows with time (the
error is spread along the item and grows towards its end; it is not an edge effect of padding).
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rt_server.model.config import MAX_PHONEMES
from rt_server.model.kmodel import BatchItem, KModel
from rt_server.model.runner import make_speechlike, tiny_model

AUDIO_BOUND = 0.05  # max |batch - single| / peak(single)


@pytest.fixture(scope="module")
def model() -> KModel:
    return tiny_model(seed=0)


def _phonemes(rng: random.Random, vocab: list[str], n: int) -> str:
    return "".join(rng.choice(vocab) for _ in range(n))


def _assert_batch_equals_singles(model: KModel, items: list[BatchItem], seeds: list[int | None]) -> None:
    def fresh(i: int) -> BatchItem:
        it = items[i]
        gen = None if seeds[i] is None else torch.Generator().manual_seed(seeds[i])
        return BatchItem(it.input_ids, it.ref_s, it.speed, seeds[i] is not None, gen)

    batch = model.forward_batch([fresh(i) for i in range(len(items))])
    for i, out in enumerate(batch):
        single = model.forward_batch([fresh(i)])[0]
        assert torch.equal(out.pred_dur, single.pred_dur), f"item {i}: durations differ"
        assert out.audio.shape == single.audio.shape
        peak = float(single.audio.abs().max())
        error = float((out.audio - single.audio).abs().max())
        assert error <= AUDIO_BOUND * peak, f"item {i}: audio differs by {error / peak:.4f} of its peak"


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=16),
    seed=st.integers(0, 2**16),
    noisy=st.booleans(),
)
def test_random_batches_match_single_runs(model: KModel, sizes: list[int], seed: int, noisy: bool) -> None:
    rng = random.Random(seed)
    vocab = list(model.vocab)
    items, seeds = [], []
    for n in sizes:
        style = torch.randn(256, generator=torch.Generator().manual_seed(rng.randrange(2**31))) * 0.15
        items.append(BatchItem(torch.tensor(model.tokenize(_phonemes(rng, vocab, n))), style, rng.uniform(0.5, 2.0)))
        seeds.append(rng.randrange(2**31) if noisy and rng.random() < 0.7 else None)
    _assert_batch_equals_singles(model, items, seeds)


def test_extreme_lengths_in_one_batch(model: KModel) -> None:
    rng = random.Random(3)
    vocab = list(model.vocab)
    lengths = [1, MAX_PHONEMES, 37]
    items = [
        BatchItem(torch.tensor(model.tokenize(_phonemes(rng, vocab, n))), torch.full((256,), 0.1 * k), 2.0)
        for k, n in enumerate(lengths)
    ]
    _assert_batch_equals_singles(model, items, [None, 1, 2])


def test_padding_changes_nothing_when_lengths_are_equal(model: KModel) -> None:
    ids = torch.tensor(model.tokenize("həlˈO"))
    style = torch.full((256,), 0.05)
    outs = model.forward_batch([BatchItem(ids, style, 1.0, False)] * 3)
    assert all(torch.equal(o.audio, outs[0].audio) for o in outs)


def test_empty_batch_returns_nothing(model: KModel) -> None:
    assert model.forward_batch([]) == []


@pytest.mark.slow
def test_full_size_batch_matches_single_runs() -> None:
    torch.manual_seed(0)
    model = KModel()
    make_speechlike(model)
    rng = random.Random(5)
    vocab = list(model.vocab)
    items = [
        BatchItem(torch.tensor(model.tokenize(_phonemes(rng, vocab, n))), torch.randn(256) * 0.15, s)
        for n, s in ((3, 1.0), (24, 0.8), (11, 1.6))
    ]
    _assert_batch_equals_singles(model, items, [None, None, 4])
