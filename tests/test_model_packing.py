"""Convolution weights packed once into oneDNN's layout (bf16 on the CPU): the same computation, bit for bit,
without a weight reorder on every call (tiny model, random weights)."""

from __future__ import annotations

import pytest
import torch

from rt_server.model.layers import (
    PackableLinear,
    WeightNormMixin,
    WNConv1d,
    WNConvTranspose1d,
    weight_packing_available,
)
from rt_server.model.runner import tiny_model

pytestmark = pytest.mark.skipif(not weight_packing_available(), reason="this torch has no oneDNN bf16 convolution")


def _packed(model: torch.nn.Module) -> list[WeightNormMixin]:
    return [m for m in model.modules() if isinstance(m, WeightNormMixin) and m.packed_weight is not None]


def test_bf16_packs_the_decoders_convolutions_and_fp32_packs_none() -> None:
    model = tiny_model(seed=0)
    assert _packed(model) == []
    model.set_precision("bf16")
    decoder = [m for m in model.decoder.modules() if isinstance(m, WeightNormMixin)]
    assert _packed(model) == decoder  # every weight-normed convolution of the decoder, and nothing else
    assert any(isinstance(m, WNConvTranspose1d) for m in decoder) and any(isinstance(m, WNConv1d) for m in decoder)
    model.set_precision("fp32")
    assert _packed(model) == []


def test_packed_weights_compute_exactly_what_the_plain_ones_do() -> None:
    """Through the whole model too, with the channels-last activations the packed convolutions leave."""
    model = tiny_model(seed=0)
    model.set_precision("bf16")
    model.bucket_lengths = False
    style = torch.randn(256, generator=torch.Generator().manual_seed(3)) * 0.15
    items = [model.item(p, style, noise=False) for p in ("ðə kwˈɪk bɹˈWn fˈɑks", "hˈɛlO")]
    packed = model.forward_batch(items)
    for m in _packed(model):
        m.packed_weight = None
    plain = model.forward_batch(items)
    for a, b in zip(packed, plain, strict=True):
        assert torch.equal(a.pred_dur, b.pred_dur)
        assert torch.equal(a.audio, b.audio)


@pytest.mark.parametrize(("stride", "dilation", "groups"), [(1, 1, 1), (1, 5, 1), (2, 1, 1), (1, 1, 4)])
def test_a_packed_convolution_equals_conv1d(stride: int, dilation: int, groups: int) -> None:
    torch.manual_seed(0)
    conv = WNConv1d(8, 16, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups)
    conv.fold_weight_norm(torch.bfloat16)
    x = torch.randn(2, 8, 37).bfloat16()
    with torch.inference_mode():
        plain = conv(x)
        assert conv.pack_weight() is True
        packed = conv(x)
    assert packed.dtype == torch.bfloat16 and packed.shape == plain.shape
    assert packed.stride(1) == 1  # left in oneDNN's channels-last layout for the next convolution
    assert torch.equal(packed, plain)
    conv.fold_weight_norm(torch.bfloat16)  # a new fold drops the packed copy of the old one
    assert conv.packed_weight is None
    conv.fold_weight_norm(None)
    assert conv.pack_weight() is False  # only bf16 weights are packed


def test_a_packed_transposed_convolution_equals_conv_transpose1d() -> None:
    torch.manual_seed(0)
    for groups, out in ((1, 6), (8, 8)):
        conv = WNConvTranspose1d(8, out, 4, stride=2, padding=1, output_padding=0, groups=groups)
        conv.fold_weight_norm(torch.bfloat16)
        x = torch.randn(1, 8, 21).bfloat16()
        with torch.inference_mode():
            plain = conv(x)
            assert conv.pack_weight() is True
            assert torch.equal(conv(x), plain)


def test_bf16_packs_albert_for_the_cpu_and_fp32_keeps_the_references_products() -> None:
    model = tiny_model(seed=0)
    linears = [m for m in model.modules() if isinstance(m, PackableLinear)]
    assert len(linears) == 8  # ALBERT's seven layers and the projection after it
    assert all(m.packed_weight is None for m in linears)
    model.set_precision("bf16")
    assert all(m.packed_weight is not None for m in linears)
    model.set_precision("fp32")
    assert all(m.packed_weight is None for m in linears)


def test_a_packed_linear_layer_equals_nn_linear_to_float_rounding() -> None:
    torch.manual_seed(0)
    layer = PackableLinear(48, 80)
    x = torch.randn(2, 13, 48)
    with torch.inference_mode():
        plain = layer(x)
        assert layer.pack_weight() is True
        packed = layer(x)
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x[0]), packed[0])  # any number of rows runs on the one packed copy
        assert layer.pack_weight(False) is False
        assert torch.equal(layer(x), plain)
    layer.to(torch.bfloat16)
    assert layer.pack_weight() is False  # float32 weights only


def test_bf16_durations_equal_fp32_with_the_packed_front() -> None:
    fp32, bf16 = tiny_model(seed=0), tiny_model(seed=0)
    bf16.set_precision("bf16")
    style = torch.randn(256, generator=torch.Generator().manual_seed(5)) * 0.15
    for phonemes in ("ðə kwˈɪk bɹˈWn fˈɑks ʤˈʌmps", "hˈɛlO wˈɜɹld", "ɐ"):
        a = fp32.forward_batch([fp32.item(phonemes, style, noise=False)])[0]
        b = bf16.forward_batch([bf16.item(phonemes, style, noise=False)])[0]
        assert torch.equal(a.pred_dur, b.pred_dur)
