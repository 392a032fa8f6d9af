"""A style's AdaIN affines for many layers at once, for the decoder's fused AdaIN layers.

Every AdaIN layer turns the style vector into a per-channel scale and shift (`AdaIN1d.affine`: its style
projection, `1 + gamma`, the norm's own affine folded in). The result depends on the style alone, so within
one segment it is the same for every window and every pass, yet computed per layer per call it is some 15 small
operations, about 600 per generator pass: 13 of a 32-frame window's 82 ms on a 2-core CPU. `StyleProjection`
stacks the projections of all the decoder's fused layers into one float32 product; its `StyleAffines` are
computed once per batch (`KModel._prepare`) and looked up by each layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from rt_server.model.layers import AdaIN1d


def fold_affine(gamma: Tensor, beta: Tensor, norm_weight: Tensor, norm_bias: Tensor) -> tuple[Tensor, Tensor]:
    """AdaIN's `(1 + gamma) * (w * IN(x) + b) + beta` as one scale and shift applied to IN(x)."""
    gain = 1 + gamma
    return gain * norm_weight, gain * norm_bias + beta


@dataclass(frozen=True, eq=False)
class StyleAffines:
    """Styles [B, style_dim] with each projected layer's float32 scale and shift, [B, C, 1] each."""

    vector: Tensor
    affines: Mapping[AdaIN1d, tuple[Tensor, Tensor]]

    def rows(self, index: Sequence[int]) -> StyleAffines:
        """These items of the batch, in this order."""
        if list(index) == list(range(len(self.vector))):
            return self
        picked = torch.tensor(list(index), device=self.vector.device)
        return StyleAffines(
            self.vector[picked],
            {layer: (scale[picked], shift[picked]) for layer, (scale, shift) in self.affines.items()},
        )


class StyleProjection(nn.Module):
    """The style projections of `layers` stacked into one product (float32 copies of their weights).

    A cache, like the convolutions' folded weights: built from the layers' parameters when created
    (`KModel.set_precision` builds it, and `load_weights` runs that), its tensors non-persistent buffers that
    follow `.to()` and never reach a checkpoint.
    """

    gamma_weight: Tensor
    beta_weight: Tensor
    gamma_bias: Tensor
    beta_bias: Tensor
    norm_weight: Tensor
    norm_bias: Tensor

    def __init__(self, layers: Sequence[AdaIN1d]) -> None:
        super().__init__()
        self.layers = list(layers)  # a plain list: the layers stay their parents' submodules, not ours
        self.sizes = [layer.channels for layer in self.layers]
        with torch.no_grad():
            parts: dict[str, list[Tensor]] = {
                "gamma_weight": [layer.fc.weight[: layer.channels] for layer in self.layers],
                "beta_weight": [layer.fc.weight[layer.channels :] for layer in self.layers],
                "gamma_bias": [layer.fc.bias[: layer.channels] for layer in self.layers],
                "beta_bias": [layer.fc.bias[layer.channels :] for layer in self.layers],
                "norm_weight": [layer.norm.weight for layer in self.layers],
                "norm_bias": [layer.norm.bias for layer in self.layers],
            }
            for name, tensors in parts.items():
                self.register_buffer(name, torch.cat(tensors).detach().float(), persistent=False)

    def forward(self, s: Tensor) -> StyleAffines:
        """The affines of every layer under styles s [B, style_dim]: `AdaIN1d.affine`'s values, in one
        product (equal to the layer's own up to the float32 sums' order)."""
        with torch.autocast(device_type=s.device.type, enabled=False):
            # `.float()` is free on the float32 buffers and keeps the contract if a caller casts the module.
            s32 = s.float()
            scale, shift = fold_affine(
                F.linear(s32, self.gamma_weight.float(), self.gamma_bias.float()),
                F.linear(s32, self.beta_weight.float(), self.beta_bias.float()),
                self.norm_weight.float(),
                self.norm_bias.float(),
            )
        scales = torch.split(scale, self.sizes, dim=1)
        shifts = torch.split(shift, self.sizes, dim=1)
        affines = {
            layer: (a.unsqueeze(-1).contiguous(), b.unsqueeze(-1).contiguous())
            for layer, a, b in zip(self.layers, scales, shifts, strict=True)
        }
        return StyleAffines(s, affines)
