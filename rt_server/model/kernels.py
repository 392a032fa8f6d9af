"""The decoder's fused element-wise work under reduced precision: AdaIN (statistics, style affine) and Snake.

At the generator's sample-level resolutions this work reads and writes the largest activations in the model
(128 channels x 120 positions per frame), and on a CPU it costs nearly as much as the convolutions when run as
separate eager operations. One function, two implementations:

- `adain_act_eager` (the default): a handful of ATen calls. Statistics by a float32 two-pass mean and variance
  (ATen's `var_mean` is several times slower on the CPU and, reading bfloat16, less accurate), folded into one
  float32 scale and shift per channel; the affine and Snake then run in the activation's dtype.
- `adain_act_reference` compiled by `torch.compile` (Inductor; `KModel.compile_kernels()`): everything in
  float32, rounded once to the activation's dtype at the end, fused into two passes over the activation.
  Compilation happens per input kind (dtype, with or without Snake, one item or several, masked or not): about
  a minute in all on a 2-core CPU the first time, less from Inductor's on-disk cache. Lengths are dynamic, so
  segments of any length reuse it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

INSTANCE_NORM_EPS = 1e-5

AdainAct = Callable[[Tensor, Tensor | None, Tensor, Tensor, Tensor | None], Tensor]


def apply_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padding (a no-op without a mask), in x's dtype: a float32 mask would promote a bf16 activation
    to float32, and the masked path would then run its element-wise work and casts in float32."""
    return x if mask is None else x * mask.to(x.dtype)


def moments(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean, centred float32 input (zero on padding) and biased variance over each item's own
    positions (all of them when `mask` is None): two passes in float32."""
    xf = x.float()
    if mask is None:
        mean = xf.mean(dim=-1, keepdim=True)
        centred = xf - mean
        return mean, centred, (centred * centred).mean(dim=-1, keepdim=True)
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
    mean = (xf * mask).sum(dim=-1, keepdim=True) / count
    centred = (xf - mean) * mask
    return mean, centred, (centred * centred).sum(dim=-1, keepdim=True) / count


def adain_act_reference(x: Tensor, mask: Tensor | None, scale: Tensor, shift: Tensor, alpha: Tensor | None) -> Tensor:
    """`snake(IN(x) * scale + shift)` (or without Snake when `alpha` is None), masked, in x's dtype.

    x: [B, C, L]; mask: [B, 1, L] float (1.0 on an item's own positions) or None (nothing padded);
    scale, shift: [B, C, 1] float32 (the style's `1 + gamma` and `beta` with the norm's affine folded in);
    alpha: [1, C, 1] float32 Snake parameter. Statistics cover each item's own positions only. The output is
    zero on the padding.
    """
    _, centred, var = moments(x, mask)
    y = centred * (scale * torch.rsqrt(var + INSTANCE_NORM_EPS)) + shift
    if alpha is not None:
        wave = torch.sin(y * alpha)
        y = y + wave * wave * alpha.reciprocal()
    if mask is not None:
        y = y * mask
    return y.to(x.dtype)


def adain_act_eager(x: Tensor, mask: Tensor | None, scale: Tensor, shift: Tensor, alpha: Tensor | None) -> Tensor:
    """`adain_act_reference` in fewer eager passes: the affine and Snake run in x's dtype on a float32-derived
    per-channel scale and shift (one rounding of each per channel, the element-wise work in bf16)."""
    mean, _, var = moments(x, mask)
    a = scale * torch.rsqrt(var + INSTANCE_NORM_EPS)
    y = torch.addcmul((shift - mean * a).to(x.dtype), x, a.to(x.dtype))
    if alpha is not None:
        alpha = alpha.to(x.dtype)
        wave = torch.mul(y, alpha).sin_()
        y = torch.addcmul(y, wave.mul_(wave), alpha.reciprocal())
    return apply_mask(y, mask)


_compiled: AdainAct | None = None


def compiled_adain_act() -> AdainAct:
    """`adain_act_reference` through `torch.compile` (one compiled function per process, shared by every
    model). Compilation is lazy: the first call per input kind compiles, and fails there if Inductor cannot
    run on this machine (callers probe it; see `KModel.compile_kernels`)."""
    global _compiled
    if _compiled is None:
        # One compiled variant per input kind: activation dtype (float32 in the decoder's first blocks,
        # reduced after a convolution) x with or without Snake x batch of one or more x masked or not, and
        # some of them again per channel count where Inductor specialised on the sizes it met.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        # Not fullgraph: past the recompile limit dynamo runs the function as plain Python (the same result,
        # slower) instead of raising in the middle of a request.
        _compiled = torch.compile(adain_act_reference, dynamic=True)
    return _compiled


# int8 activations (precision "int8"): unsigned, with zero at this code, so that the zeroed padding is exact.
U8_ZERO_POINT = 128
U8_STEPS = 127  # codes each side of the zero point that the largest magnitude maps to (255 - 128 would be 127 too)

Quantize = Callable[[Tensor], tuple[Tensor, Tensor]]


def quantize_u8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor symmetric quantisation for oneDNN's int8 convolution: `(q, scale)` with q uint8 =
    round(x / scale) + 128 clamped to [0, 255] and scale = max|x| / 127 (float32, a 0-d tensor), so that
    x ~ (q - 128) * scale, zero is exact and nothing clips."""
    amax = x.abs().amax().float().clamp_min(1e-12)
    scale = amax / U8_STEPS
    q = torch.clamp(torch.round(x.float() / scale) + U8_ZERO_POINT, 0, 255).to(torch.uint8)
    return q, scale


_compiled_quantize: Quantize | None = None


def compiled_quantize_u8() -> Quantize:
    """`quantize_u8` through `torch.compile`: two passes over x (its maximum, then the codes) instead of six
    eager ones. Lazy like `compiled_adain_act`."""
    global _compiled_quantize
    if _compiled_quantize is None:
        _compiled_quantize = torch.compile(quantize_u8, dynamic=True)
    return _compiled_quantize
