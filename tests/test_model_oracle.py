"""Parity with the published reference implementation (PyPI `kokoro` 0.9.4), used as a test-only oracle.

The oracle is imported without its text pipeline (which needs misaki): a bare package object whose path points at
the installed files lets `kokoro.model` import alone. It loads our checkpoint file, so this also proves that what
we write is what the reference reads.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from rt_server.model.checkpoint import save_checkpoint
from rt_server.model.config import bundled_config_dict
from rt_server.model.kmodel import KModel
from rt_server.model.runner import make_speechlike

pytestmark = [pytest.mark.oracle, pytest.mark.slow]

SENTENCES = ["həlˈO wˈɜɹld, ðɪs ɪz ɐ tˈɛst.", "ðə kwˈɪk bɹˈWn fˈɑks!"]


def _import_reference() -> Any:
    spec = importlib.util.find_spec("kokoro")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("the reference package kokoro==0.9.4 is not installed")
    if "kokoro.model" not in sys.modules:
        package = types.ModuleType("kokoro")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kokoro"] = package
    try:
        from kokoro.model import KModel as Reference
    except ImportError as exc:
        pytest.skip(f"reference model not importable: {exc}")
    return Reference


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[KModel, Any]:
    reference_cls = _import_reference()
    torch.manual_seed(0)
    ours = KModel()
    make_speechlike(ours)
    path = Path(tmp_path_factory.mktemp("oracle")) / "random.pth"
    save_checkpoint(ours.export_weights(), path)
    with pytest.warns((UserWarning, FutureWarning)):
        # The reference warns about its repo id, LSTM dropout and deprecated weight_norm while loading.
        reference = reference_cls(config=bundled_config_dict(), model=str(path)).eval()
    # The reference's silent non-strict fallback must not have hidden anything: compare every tensor.
    for section, state in ours.export_weights().items():
        theirs = getattr(reference, section).state_dict()
        for key, value in state.items():
            assert torch.equal(theirs[key], value), f"{section}.{key} did not reach the reference"
    return ours, reference


def _reference_run(reference: Any, phonemes: str, style: torch.Tensor, seed: int | None) -> Any:
    if seed is None:
        # The reference cannot switch its sine-source noise off; make its draws zero for this call.
        original = torch.randn_like
        torch.randn_like = lambda t, **kw: torch.zeros_like(t)  # type: ignore[assignment]
        try:
            return reference(phonemes, style, 1.0, return_output=True)
        finally:
            torch.randn_like = original
    torch.manual_seed(seed)
    return reference(phonemes, style, 1.0, return_output=True)


@pytest.mark.parametrize("phonemes", SENTENCES)
@pytest.mark.parametrize("seed", [None, 1234])
def test_matches_reference(models: tuple[KModel, Any], phonemes: str, seed: int | None) -> None:
    ours, reference = models
    style = torch.randn(1, 256, generator=torch.Generator().manual_seed(9)) * 0.15
    expected = _reference_run(reference, phonemes, style, seed)
    ids = torch.tensor([ours.tokenize(phonemes)])
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    audio, pred_dur = ours.forward_with_tokens(ids, style, 1.0, noise=seed is not None, generator=generator)
    assert torch.equal(pred_dur, expected.pred_dur)
    assert audio.shape == expected.audio.shape
    peak = float(expected.audio.abs().max())
    # Seen: 3e-5 absolute on a peak near 0.1-10 (float rounding only; the layers are computed the same way).
    assert float((audio - expected.audio).abs().max()) <= 1e-3 * peak
