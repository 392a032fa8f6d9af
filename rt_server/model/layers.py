"""Building blocks shared by Kokoro's sub-networks, written to be exact under padding.

Every layer that mixes information along time takes an optional mask. `None` means "no padding": the layer then
takes the same fast path as the reference (plain instance norm, unpacked LSTM). With a mask ([B, 1, L], 1.0 on
an item's own positions, 0.0 on padding) it restricts statistics to each item's own positions and re-zeroes the
padding before every convolution that could read it, so that a padded item computes what it computes alone.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_server.model.kernels import (
    INSTANCE_NORM_EPS,
    U8_ZERO_POINT,
    AdainAct,
    adain_act_eager,
    apply_mask,
    moments,
)
from rt_server.model.styles import StyleAffines, fold_affine

_log = logging.getLogger(__name__)

LEAKY_SLOPE = 0.2


def sequence_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Float mask [B, 1, max_len]: 1.0 where the position is inside the item's length."""
    positions = torch.arange(max_len, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).unsqueeze(1).float()


# The input length oneDNN picks a packed weight's layout for (`WeightNormMixin.pack_weight`); any length runs on it.
_PACK_HINT_LENGTH = 1024
# Likewise the rows (tokens) for a packed linear layer (`PackableLinear`).
_PACK_HINT_ROWS = 64


def weight_packing_available() -> bool:
    """Whether this torch runs convolutions and linear layers on weights packed once into oneDNN's layout
    (x86 CPUs with bf16)."""
    mkldnn = torch.ops.mkldnn
    return (
        bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
        and all(
            hasattr(mkldnn, op)
            for op in ("_convolution_pointwise", "_convolution_transpose_pointwise", "_linear_pointwise")
        )
        and bool(mkldnn._is_mkldnn_bf16_supported())
    )


class PackableLinear(nn.Linear):
    """`nn.Linear` (same parameters) whose float32 weight can be packed once into oneDNN's layout on the CPU
    (`pack_weight`). On a segment's few dozen tokens, MKL otherwise re-packs the weight on every call: ALBERT
    took 23.5 ms instead of 16 ms for a 13-phoneme segment. The packed product rounds differently in the last
    bits (5e-6 on ALBERT's output), so the fp32 path, which matches the reference, does not use it."""

    packed_weight: Tensor | None = None

    def pack_weight(self, enabled: bool = True) -> bool:
        """Pack (or drop) the oneDNN copy of the weight; only a float32 weight on the CPU is packed. Not a
        buffer: `.to()` and checkpoints never see it. A cache, like the convolutions' folded weights: weights
        changed afterwards are not seen until it is packed again (`KModel.set_precision` does, after loading)."""
        self.packed_weight = None
        if enabled and self.weight.device.type == "cpu" and self.weight.dtype == torch.float32:
            with torch.no_grad():
                self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_HINT_ROWS)
        return self.packed_weight is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.packed_weight is not None and x.device.type == "cpu" and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return super().forward(x)


class WeightNormMixin:
    """Weight norm stored as the published checkpoint stores it: `weight_g` (norm) and `weight_v` (direction).

    `w = g * v / ||v||`, the norm over every dim but 0. The folded weight is cached by `fold_weight_norm()`
    (a non-persistent buffer, so checkpoints keep g and v) and recomputed on every call until then.

    A bf16 folded weight on the CPU can also be packed once into oneDNN's blocked layout (`pack_weight`): the
    convolution is then the same computation, bit for bit, without reordering the weight on every call (on a CPU
    with AMX that reorder took as long as the convolution itself for the decoder's 1024-channel blocks).
    """

    weight_g: nn.Parameter
    weight_v: nn.Parameter
    folded_weight: Tensor | None
    packed_weight: Tensor | None = None

    def normed_weight(self) -> Tensor:
        """`g * v / ||v||` from the parameters, in their dtype (ignores the folded cache)."""
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def effective_weight(self) -> Tensor:
        if self.folded_weight is not None:
            return self.folded_weight
        return self.normed_weight()

    def fold_weight_norm(self, dtype: torch.dtype | None = None) -> None:
        """Cache `g * v / ||v||`, computed in float32 and stored in `dtype` (default: the parameters')."""
        with torch.no_grad():
            folded = self.normed_weight().detach().clone()
            self.folded_weight = folded if dtype is None else folded.to(dtype)
        self.packed_weight = None  # packed from the old fold: `pack_weight` again

    def pack_weight(self) -> bool:
        """Pack the folded weight into oneDNN's layout if it is bf16 on the CPU; returns whether it is packed.
        Not a buffer: `.to()` and checkpoints never see it (`fold_weight_norm` drops it).

        A packed convolution returns oneDNN's channels-last output as it is, a strided [B, C, L] view, instead
        of copying it back to contiguous: the next convolution reads it without a reorder, and element-wise
        work takes any layout (the copies were 28 of a first segment's 164 ms)."""
        weight = self.folded_weight
        self.packed_weight = None
        if weight is not None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
            with torch.no_grad():
                self.packed_weight = self._pack(weight.unsqueeze(2))
        return self.packed_weight is not None

    def _pack(self, weight: Tensor) -> Tensor:
        """The folded weight [out, in, 1, k] (a 2-D convolution's over [B, C, 1, L]) in oneDNN's layout."""
        raise NotImplementedError

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """A reduced-precision folded weight sets the dtype; otherwise the input does (autocast may lower it)."""
        weight = self.effective_weight()
        return x.dtype if weight.dtype == torch.float32 else weight.dtype

    def unfold_weight_norm(self) -> None:
        self.folded_weight = None


class WNConv1d(WeightNormMixin, nn.Module):
    """A weight-normed Conv1d (`*.weight_g`, `*.weight_v`, `*.bias`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight_g = nn.Parameter(torch.ones(out_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size))
        nn.init.normal_(self.weight_v, 0.0, 0.01)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.register_buffer("folded_weight", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.packed_weight is not None and dtype == torch.bfloat16 and x.device.type == "cpu":
            y = torch.ops.mkldnn._convolution_pointwise(
                x.to(dtype).unsqueeze(2), self.packed_weight, bias, *self._geometry2d(), self.groups, "none", [], None
            )
            return y.squeeze(2)  # channels-last: see `pack_weight`
        weight = self.effective_weight().to(dtype)
        return F.conv1d(x.to(dtype), weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _geometry2d(self) -> tuple[list[int], list[int], list[int]]:
        """Padding, stride and dilation of this convolution as a 2-D one over [B, C, 1, L]."""
        return [0, self.padding], [1, self.stride], [1, self.dilation]

    def _pack(self, weight: Tensor) -> Tensor:
        padding, stride, dilation = self._geometry2d()
        size = [1, self.weight_v.shape[1] * self.groups, 1, _PACK_HINT_LENGTH]
        reorder = torch.ops.aten.mkldnn_reorder_conv2d_weight  # with the input size, which torch's stub lacks
        return reorder(weight.to_mkldnn(), padding, stride, dilation, self.groups, size)


def int8_convolution_available() -> bool:
    """Whether this torch has oneDNN's int8 convolution (the kernel Inductor's x86 quantisation lowers to)."""
    onednn = torch.ops.onednn
    return bool(torch.backends.mkldnn.is_available()) and all(  # type: ignore[no-untyped-call]
        hasattr(onednn, op) for op in ("qconv_prepack", "qconv_pointwise")
    )


class Int8Conv1d:
    """A `WNConv1d` (stride 1, no groups) as oneDNN's int8 convolution, for the CPU's VNNI instructions.

    Weights: the folded float32 weight quantised per output channel (symmetric, int8), packed once into
    oneDNN's layout. Input: uint8 codes and a per-tensor scale (`kernels.quantize_u8`). Output: bfloat16,
    dequantised and biased in the kernel. Not a module: nothing here is a parameter or in a checkpoint.
    """

    def __init__(self, conv: nn.Module) -> None:
        if not isinstance(conv, WNConv1d) or conv.stride != 1 or conv.groups != 1:
            raise ValueError("Int8Conv1d takes stride-1, ungrouped WNConv1d convolutions")
        with torch.no_grad():
            weight = conv.normed_weight().detach().float().cpu()
            self.w_scale = (weight.abs().amax(dim=(1, 2)) / 127.0).clamp_min(1e-12)
            codes = torch.clamp(torch.round(weight / self.w_scale[:, None, None]), -128, 127).to(torch.int8)
            self.bias = None if conv.bias is None else conv.bias.detach().float().cpu()
        self.w_zero = torch.zeros(weight.shape[0], dtype=torch.long)
        self.padding, self.dilation = [conv.padding], [conv.dilation]
        # The input scale given here only picks the packed layout; each call passes its own.
        self.packed = torch.ops.onednn.qconv_prepack(
            codes, self.w_scale, 1.0, U8_ZERO_POINT, [1], self.padding, self.dilation, 1, None
        )

    def __call__(self, codes: Tensor, scale: Tensor) -> Tensor:
        """codes: uint8 [B, C_in, L] (zero at `U8_ZERO_POINT`); scale: the codes' step. Returns bf16."""
        return torch.ops.onednn.qconv_pointwise(
            codes,
            float(scale),
            U8_ZERO_POINT,
            self.packed,
            self.w_scale,
            self.w_zero,
            self.bias,
            [1],
            self.padding,
            self.dilation,
            1,
            1.0,
            0,
            torch.bfloat16,
            "none",
            [],
            "",
        )


class WNConvTranspose1d(WeightNormMixin, nn.Module):
    """A weight-normed ConvTranspose1d. Its `weight_g` is [in, 1, 1]: dim 0 of a transposed weight is input."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int,
        padding: int,
        output_padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.stride, self.padding, self.output_padding, self.groups = stride, padding, output_padding, groups
        self.weight_g = nn.Parameter(torch.ones(in_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(in_channels, out_channels // groups, kernel_size))
        nn.init.normal_(self.weight_v, 0.0, 0.01)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("folded_weight", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype(x)
        if self.packed_weight is not None and dtype == torch.bfloat16 and x.device.type == "cpu":
            padding, output_padding, stride = [0, self.padding], [0, self.output_padding], [1, self.stride]
            y = torch.ops.mkldnn._convolution_transpose_pointwise(
                x.to(dtype).unsqueeze(2),
                self.packed_weight,
                self.bias.to(dtype),
                padding,
                output_padding,
                stride,
                [1, 1],
                self.groups,
                "none",
                [],
                None,
            )
            return y.squeeze(2)  # channels-last: see `pack_weight`
        weight = self.effective_weight().to(dtype)
        return F.conv_transpose1d(
            x.to(dtype), weight, self.bias.to(dtype), self.stride, self.padding, self.output_padding, self.groups
        )

    def _pack(self, weight: Tensor) -> Tensor:
        size = [1, self.weight_v.shape[0], 1, _PACK_HINT_LENGTH]
        return torch.ops.mkldnn._reorder_convolution_transpose_weight(
            weight, [0, self.padding], [0, self.output_padding], [1, self.stride], [1, 1], self.groups, size
        )


def instance_norm(x: Tensor, mask: Tensor | None, eps: float = INSTANCE_NORM_EPS) -> Tensor:
    """Instance norm over time (biased variance), over each item's own positions only when masked."""
    if mask is None:
        return F.instance_norm(x, eps=eps)
    _, centred, var = moments(x, mask)
    return centred * torch.rsqrt(var + eps)  # zero on the padding


class InstanceNormAffine(nn.Module):
    """`nn.InstanceNorm1d(C, affine=True)`'s parameters: absent from the published checkpoint, so 1 and 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return instance_norm(x, mask) * self.weight[:, None] + self.bias[:, None]


def snake(x: Tensor, alpha: Tensor) -> Tensor:
    """Snake activation `x + sin(alpha x)^2 / alpha` (per-channel alpha [1, C, 1]), in the reference's order."""
    return x + (1 / alpha) * (torch.sin(alpha * x) ** 2)


class AdaIN1d(nn.Module):
    """Adaptive instance norm: `(1 + gamma(s)) * IN(x) + beta(s)`, optionally followed by Snake.

    `fused` (set for reduced precision) runs the norm, the style affine, Snake and the mask as one kernel
    (`kernel`: `rt_server.model.kernels.adain_act_eager`, or the compiled `adain_act_reference`): the same
    function with fewer roundings. The default path computes in the reference's own order. A compiled kernel
    that fails (a new input kind it cannot compile) is replaced by the eager one for good, with a warning.
    """

    def __init__(self, style_dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm = InstanceNormAffine(channels)
        self.fc = nn.Linear(style_dim, channels * 2)
        self.fused = False
        self.kernel: AdainAct = adain_act_eager

    def affine(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """The fused path's per-channel scale and shift [B, C, 1] under styles s [B, style_dim], in float32:
        `(1 + gamma) * norm.weight` and `(1 + gamma) * norm.bias + beta`."""
        with torch.autocast(device_type=s.device.type, enabled=False):
            gamma, beta = torch.chunk(F.linear(s.float(), self.fc.weight.float(), self.fc.bias.float()), 2, dim=1)
            scale, shift = fold_affine(gamma, beta, self.norm.weight.float(), self.norm.bias.float())
        return scale.unsqueeze(-1), shift.unsqueeze(-1)

    def forward(self, x: Tensor, s: Tensor | StyleAffines, mask: Tensor | None, alpha: Tensor | None = None) -> Tensor:
        """AdaIN of x [B, C, L] under style s [B, style_dim] (or its affines, computed ahead for the fused
        path: `StyleProjection`), then Snake with `alpha` if given; zero on the padding."""
        if not self.fused:
            vector = s.vector if isinstance(s, StyleAffines) else s
            gamma, beta = torch.chunk(self.fc(vector).unsqueeze(-1), chunks=2, dim=1)
            y = (1 + gamma) * self.norm(x, mask) + beta
            return apply_mask(y if alpha is None else snake(y, alpha), mask)
        scale, shift = s.affines[self] if isinstance(s, StyleAffines) else self.affine(s)
        snake_alpha = None if alpha is None else alpha.float()
        if self.kernel is adain_act_eager:
            return adain_act_eager(x, mask, scale, shift, snake_alpha)
        try:
            return self.kernel(x, mask, scale, shift, snake_alpha)
        except torch.OutOfMemoryError:
            raise  # the engine splits the batch; eager would run out of memory too
        except Exception as exc:
            _log.warning(
                "compiled AdaIN kernel failed, using the eager one from now on: %s: %s", type(exc).__name__, exc
            )
            self.kernel = adain_act_eager
            return adain_act_eager(x, mask, scale, shift, snake_alpha)


class AdaLayerNorm(nn.Module):
    """Adaptive layer norm over channels (no affine of its own), for [B, T, C] input."""

    def __init__(self, style_dim: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.fc = nn.Linear(style_dim, channels * 2)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        h = self.fc(s).unsqueeze(1)
        gamma, beta = torch.chunk(h, chunks=2, dim=-1)
        return (1 + gamma) * F.layer_norm(x, (self.channels,), eps=self.eps) + beta


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of [B, C, T] input, with parameters named `gamma`/`beta`."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.transpose(1, -1), (self.channels,), self.gamma, self.beta, self.eps)
        return y.transpose(1, -1)


class AdainResBlk1d(nn.Module):
    """Residual block with AdaIN, optionally upsampling time 2x (depthwise transposed conv + nearest shortcut)."""

    def __init__(self, dim_in: int, dim_out: int, style_dim: int, *, upsample: bool = False) -> None:
        super().__init__()
        self.upsample = upsample
        self.learned_sc = dim_in != dim_out
        self.conv1 = WNConv1d(dim_in, dim_out, 3, padding=1)
        self.conv2 = WNConv1d(dim_out, dim_out, 3, padding=1)
        self.norm1 = AdaIN1d(style_dim, dim_in)
        self.norm2 = AdaIN1d(style_dim, dim_out)
        if self.learned_sc:
            self.conv1x1 = WNConv1d(dim_in, dim_out, 1, bias=False)
        if upsample:
            self.pool = WNConvTranspose1d(dim_in, dim_in, 3, stride=2, padding=1, output_padding=1, groups=dim_in)

    def forward(self, x: Tensor, s: Tensor | StyleAffines, mask: Tensor | None, out_mask: Tensor | None) -> Tensor:
        """`mask` covers x's length, `out_mask` the output's (twice as long when upsampling)."""
        res = F.leaky_relu(self.norm1(x, s, mask), LEAKY_SLOPE)
        if self.upsample:
            res = self.pool(apply_mask(res, mask))
        res = self.conv1(apply_mask(res, out_mask))
        res = F.leaky_relu(self.norm2(res, s, out_mask), LEAKY_SLOPE)
        res = self.conv2(apply_mask(res, out_mask))
        shortcut = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.upsample else x
        if self.learned_sc:
            shortcut = self.conv1x1(shortcut)
        return (res + shortcut) * (1.0 / math.sqrt(2.0))


def reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each item of [B, T, C] within its own length; the padding stays where it is."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return torch.gather(x, 1, index[:, :, None].expand(-1, -1, x.shape[2]))


def run_lstm(lstm: nn.LSTM, x: Tensor, lengths: Tensor | None) -> Tensor:
    """Run a one-layer, batch-first, bidirectional LSTM over [B, T, C], exactly per item when padded.

    Unpadded, this is the plain LSTM call. Padded, the forward direction runs over the padded batch as it is
    (trailing padding cannot reach earlier steps), and the backward direction runs forwards over each item
    reversed within its own length, so it starts at the item's own last position; outputs on the padding are
    zero. This computes what packing computes, but with the fused kernel (packed sequences fall back to a
    step-by-step loop on the CPU that was slower than running the items one by one).
    """
    # LSTMs stay in float32 under reduced precision: oneDNN's bf16 LSTM re-packs its weights on every call,
    # which cost more than the whole recurrence on the CPU, and durations come from these outputs.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _run_lstm_fp32(lstm, x.float(), lengths)


def _run_lstm_fp32(lstm: nn.LSTM, x: Tensor, lengths: Tensor | None) -> Tensor:
    if lengths is None:
        out, _ = lstm(x)
        return out
    assert lstm.bidirectional and lstm.num_layers == 1 and lstm.batch_first
    zeros = x.new_zeros(1, x.shape[0], lstm.hidden_size)

    def direction(inputs: Tensor, suffix: str) -> Tensor:
        params = [getattr(lstm, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        out, _, _ = torch.lstm(inputs, (zeros, zeros), params, True, 1, 0.0, False, False, True)
        return out

    forward = direction(x, "")
    backward = reverse_within_lengths(direction(reverse_within_lengths(x, lengths), "_reverse"), lengths)
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[:, :, None]
    return torch.cat([forward, backward], dim=-1) * valid
