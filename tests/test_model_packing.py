"""Convolution weights packed once into oneDNN's layout (bf16 on the CPU): the same computation, bit for bit,
without a weight reorder on every call (tiny model, random weights)."""

from __future__ import annotations

import pytest
import torch

from rt_server.model.layers import WeightNormMixin, WNConv1d, WNConvTranspose1d, weight_packing_available
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
    assert packed.is_contiguous() and packed.dtype == torch.bfloat16
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
