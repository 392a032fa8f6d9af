"""KModel on the tiny configuration: interface, the length rule, input validation, noise control."""

from __future__ import annotations

import pytest
import torch

from rt_server.model.config import SAMPLES_PER_FRAME, load_config, tiny_config_dict
from rt_server.model.kmodel import KModel, PhonemeError
from rt_server.model.runner import tiny_model

HELLO = "həlˈO wˈɜɹld."


@pytest.fixture(scope="module")
def model() -> KModel:
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def style() -> torch.Tensor:
    return torch.randn(1, 256, generator=torch.Generator().manual_seed(7)) * 0.15


def test_bundled_config_is_the_published_v1_0() -> None:
    cfg = load_config()
    assert len(cfg.vocab) == 114
    assert cfg.vocab["ɹ"] == 123 and cfg.vocab["ᵻ"] == 177 and cfg.vocab[" "] == 16
    assert cfg.n_token == 178 and cfg.hidden_dim == 512 and cfg.style_dim == 128
    assert cfg.max_phonemes == 510


def test_full_size_model_has_the_published_parameter_counts() -> None:
    model = KModel()  # random weights
    assert sum(p.numel() for p in model.parameters()) == 81_810_022
    sections = model.export_weights()
    assert {k: len(v) for k, v in sections.items()} == {
        "bert": 25,
        "bert_encoder": 2,
        "predictor": 122,
        "text_encoder": 24,
        "decoder": 375,
    }
    assert sum(t.numel() for sd in sections.values() for t in sd.values()) == 81_763_410


def test_audio_is_600_samples_per_predicted_frame(model: KModel, style: torch.Tensor) -> None:
    ids = torch.tensor([model.tokenize(HELLO)])
    audio, pred_dur = model.forward_with_tokens(ids, style, 1.0, noise=False)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert pred_dur.shape == (len(HELLO) + 2,)
    assert bool((pred_dur >= 1).all())
    assert audio.numel() == SAMPLES_PER_FRAME * int(pred_dur.sum())
    assert bool(torch.isfinite(audio).all()) and float(audio.abs().max()) > 0


def test_call_with_phonemes_equals_forward_with_tokens(model: KModel, style: torch.Tensor) -> None:
    audio = model(HELLO, style, 1.0, noise=False)
    ids = torch.tensor([model.tokenize(HELLO)])
    expected, _ = model.forward_with_tokens(ids, style, 1.0, noise=False)
    assert torch.equal(audio, expected)


def test_speed_divides_durations(model: KModel, style: torch.Tensor) -> None:
    ids = torch.tensor([model.tokenize(HELLO)])
    _, slow = model.forward_with_tokens(ids, style, 0.5, noise=False)
    _, fast = model.forward_with_tokens(ids, style, 2.0, noise=False)
    assert int(slow.sum()) > int(fast.sum())


def test_tokenize_adds_boundaries_and_uses_the_vocab(model: KModel) -> None:
    assert model.tokenize("ab") == [0, 43, 44, 0]


def test_unknown_symbols_are_rejected_by_name(model: KModel) -> None:
    with pytest.raises(PhonemeError, match=r"'9' \(U\+0039\).*'#' \(U\+0023\)") as info:
        model.tokenize("hə9lo#9")
    assert info.value.unknown == ["9", "#"]


def test_over_long_input_is_rejected_not_truncated(model: KModel) -> None:
    model.tokenize("a" * 510)
    with pytest.raises(PhonemeError, match="511 phonemes exceed the model's limit of 510"):
        model.tokenize("a" * 511)


def test_empty_input_is_rejected(model: KModel) -> None:
    with pytest.raises(PhonemeError, match="empty"):
        model.tokenize("")


def test_noise_off_is_deterministic(model: KModel, style: torch.Tensor) -> None:
    torch.manual_seed(1)
    first = model(HELLO, style, noise=False)
    torch.manual_seed(2)
    second = model(HELLO, style, noise=False)
    assert torch.equal(first, second)


def test_seeded_noise_is_reproducible_and_seed_dependent(model: KModel, style: torch.Tensor) -> None:
    def run(seed: int) -> torch.Tensor:
        return model(HELLO, style, noise=True, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(5), run(5), run(6)
    silent = model(HELLO, style, noise=False)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, silent)


def test_unseeded_noise_follows_the_global_generator(model: KModel, style: torch.Tensor) -> None:
    torch.manual_seed(11)
    first = model(HELLO, style)
    torch.manual_seed(11)
    assert torch.equal(first, model(HELLO, style))


def test_model_is_in_eval_mode_and_runs_without_grad(model: KModel, style: torch.Tensor) -> None:
    assert not model.training
    audio = model(HELLO, style, noise=False)
    assert not audio.requires_grad


def test_bf16_precision_runs_and_stays_close(style: torch.Tensor) -> None:
    fp32 = tiny_model(seed=0)
    bf16 = tiny_model(seed=0)
    bf16.set_precision("bf16")
    ids = torch.tensor([fp32.tokenize(HELLO)])
    _, d32 = fp32.forward_with_tokens(ids, style, noise=False)
    a16, d16 = bf16.forward_with_tokens(ids, style, noise=False)
    assert a16.dtype == torch.float32
    # Reduced precision may move a rounding of a duration by one frame, no more.
    assert (d32 - d16).abs().max() <= 1


def test_unknown_precision_is_an_error() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        KModel(tiny_config_dict(), precision="int4")


def test_forward_with_tokens_takes_one_utterance(model: KModel, style: torch.Tensor) -> None:
    ids = torch.tensor([model.tokenize("ab"), model.tokenize("cd")])
    with pytest.raises(ValueError, match="forward_batch"):
        model.forward_with_tokens(ids, style)
