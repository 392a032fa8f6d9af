"""The decoder's style projections stacked into one product (`rt_server/model/styles.py`), and the layout the
generator's residual blocks read (tiny model, random weights)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from rt_server.model.istftnet import AdaINResBlock1
from rt_server.model.kmodel import KModel
from rt_server.model.layers import AdaIN1d, weight_packing_available
from rt_server.model.runner import tiny_model
from rt_server.model.styles import StyleAffines, StyleProjection

PHONEMES = ("ðə kwˈɪk bɹˈWn fˈɑks", "hˈɛlO")
STREAMED = (
    "ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˈOvəɹ ðə lˈAzi dˈɔɡ",
    "hˈɛlO",
    "ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps ˈOvəɹ ðə lˈAzi dˈɔɡ ənd ɹˈʌnz əwˈA",
)


def _styles(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 128, generator=torch.Generator().manual_seed(seed)) * 0.3


def _fused(model: KModel) -> list[AdaIN1d]:
    return [m for m in model.decoder.modules() if isinstance(m, AdaIN1d) and m.fused]


def _stack(model: KModel) -> StyleProjection | None:
    return model.decoder.styles


def _stacked(model: KModel, s: torch.Tensor) -> StyleAffines:
    with torch.no_grad():
        affines = model.decoder.style_affines(s)
    assert isinstance(affines, StyleAffines)
    return affines


def _bf16(seed: int = 0) -> KModel:
    model = tiny_model(seed=seed)
    with torch.no_grad():  # norms that are not the identity, so that folding their affine is exercised
        for layer in model.modules():
            if isinstance(layer, AdaIN1d):
                layer.norm.weight.uniform_(0.5, 1.5)
                layer.norm.bias.uniform_(-0.5, 0.5)
    model.set_precision("bf16")
    return model


def test_the_stack_holds_every_fused_layer_and_fp32_has_none() -> None:
    model = _bf16()
    assert model.decoder.styles is not None
    assert model.decoder.styles.layers == _fused(model)
    assert len(_fused(model)) == len([m for m in model.decoder.modules() if isinstance(m, AdaIN1d)]) > 10
    assert all(not m.fused for m in model.predictor.modules() if isinstance(m, AdaIN1d))  # durations, F0: fp32
    s = _styles(1, 0)
    assert isinstance(model.decoder.style_affines(s), StyleAffines)
    model.set_precision("fp32")
    assert _stack(model) is None
    assert model.decoder.style_affines(s) is s


def test_stacked_affines_equal_each_layers_own() -> None:
    model = _bf16()
    s = _styles(3, 1)
    stacked = _stacked(model, s)
    assert stacked.vector is s
    for layer in _fused(model):
        scale, shift = stacked.affines[layer]
        with torch.no_grad():
            want_scale, want_shift = layer.affine(s)
        assert scale.shape == shift.shape == (3, layer.channels, 1)
        assert scale.dtype == shift.dtype == torch.float32
        torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(shift, want_shift, rtol=1e-6, atol=1e-6)


def test_a_layers_affine_is_its_style_affine_with_the_norms_affine_folded_in() -> None:
    """`scale * IN(x) + shift` is `(1 + gamma) * (w * IN(x) + b) + beta`, the unfused path's formula."""
    model = _bf16()
    layer = _fused(model)[0]
    s = _styles(2, 2)
    with torch.no_grad():
        gamma, beta = torch.chunk(layer.fc(s), 2, dim=1)
        scale, shift = layer.affine(s)
    torch.testing.assert_close(scale[..., 0], (1 + gamma) * layer.norm.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shift[..., 0], (1 + gamma) * layer.norm.bias + beta, rtol=1e-5, atol=1e-6)


def test_rows_pick_items_in_order() -> None:
    model = _bf16()
    s = _styles(3, 3)
    stacked = _stacked(model, s)
    assert stacked.rows([0, 1, 2]) is stacked
    picked = stacked.rows([2, 0])
    alone = _stacked(model, s[[2, 0]])
    assert torch.equal(picked.vector, s[[2, 0]])
    for layer in _fused(model):
        for got, want in zip(picked.affines[layer], alone.affines[layer], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_new_weights_rebuild_the_stack() -> None:
    """The stack is a copy of the layers' weights: loading other weights must not leave it stale."""
    model = _bf16(seed=0)
    before = model.decoder.styles
    model.load_weights(tiny_model(seed=1).export_weights())
    assert model.decoder.styles is not None and model.decoder.styles is not before
    s = _styles(1, 4)
    stacked = _stacked(model, s)
    with torch.no_grad():
        for layer in _fused(model):
            torch.testing.assert_close(stacked.affines[layer][0], layer.affine(s)[0], rtol=1e-6, atol=1e-6)


def test_the_stack_changes_no_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model with its layers' affines looked up equals the model computing them per layer and call:
    durations exactly, audio to within float32 sums' order (the products differ only in how they are summed).
    Streamed too, with items of different styles of which only some are split, so that the second window
    renders a subset of the batch's rows."""
    model = _bf16()
    generator = torch.Generator().manual_seed(5)
    items = [model.item(p, torch.randn(256, generator=generator) * 0.3, noise=False) for p in STREAMED]
    first_frames = [24, None, 24]
    rendered: list[list[int] | None] = []
    render = model._render

    def spy(prepared: Any, windows: Any, rows: Any = None) -> list[torch.Tensor]:
        rendered.append(None if rows is None else list(rows))
        return render(prepared, windows, rows)

    monkeypatch.setattr(model, "_render", spy)
    stacked = model.forward_batch(items)
    streamed = [[chunk.audio for chunk in chunks] for chunks in model.stream_batch(items, first_frames)]
    projection = model.decoder.styles
    model.decoder.styles = None
    per_layer = model.forward_batch(items)
    per_layer_streamed = [[chunk.audio for chunk in chunks] for chunks in model.stream_batch(items, first_frames)]
    model.decoder.styles = projection
    assert [0, 2] in rendered  # the split items' openings: rows 0 and 2 of the batch
    for out, want in zip(stacked, per_layer, strict=True):
        assert torch.equal(out.pred_dur, want.pred_dur)
        torch.testing.assert_close(out.audio, want.audio, rtol=0, atol=2e-3)
    for chunks, want_chunks in zip(streamed, per_layer_streamed, strict=True):
        for audio, want_audio in zip(chunks, want_chunks, strict=True):
            torch.testing.assert_close(audio, want_audio, rtol=0, atol=2e-3)


def test_the_stack_is_float32_and_stays_out_of_checkpoints() -> None:
    model = _bf16()
    assert isinstance(model.decoder.styles, StyleProjection)
    assert not any(".styles." in key for key in model.state_dict())
    assert all(t.dtype == torch.float32 for t in model.decoder.styles.buffers())
    model.decoder.styles.to(torch.bfloat16)  # a caller casting the module: still float32 affines, not an error
    affines = _stacked(model, _styles(1, 7))
    assert all(scale.dtype == shift.dtype == torch.float32 for scale, shift in affines.affines.values())


@pytest.mark.skipif(not weight_packing_available(), reason="this torch has no oneDNN bf16 convolution")
def test_the_generators_residual_blocks_read_channels_last() -> None:
    """The packed convolutions leave channels-last activations; a block whose input is laid out otherwise adds
    two layouts in every residual sum (4x slower on this CPU). Every block's input is channels-last."""
    model = _bf16()
    strides: list[tuple[int, ...]] = []
    hooks = [
        block.register_forward_pre_hook(lambda _, args: strides.append(args[0].stride()))
        for block in model.decoder.generator.modules()
        if isinstance(block, AdaINResBlock1)
    ]
    style = _styles(1, 6)[0].repeat(2)
    model.forward_batch([model.item(PHONEMES[0], style, noise=False)])
    for hook in hooks:
        hook.remove()
    assert len(strides) == len(model.decoder.generator.resblocks) + len(model.decoder.generator.noise_res)
    assert all(stride[1] == 1 for stride in strides), strides
