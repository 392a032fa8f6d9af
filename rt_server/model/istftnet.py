"""The iSTFTNet decoder: AdaIN residual stacks, a harmonic-plus-noise sine source and an inverse STFT.

Time resolutions for an item of F duration frames: 2F (F0 curve, decoder output), 20F and 120F + 1 (generator
stages), 600F (audio samples). `FrameGeometry` carries each item's lengths and the masks at every resolution;
masks are `None` for an unpadded batch, which then runs exactly the reference's operations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_server.model.config import SAMPLE_RATE_HZ, ISTFTNetConfig
from rt_server.model.kernels import Quantize, apply_mask, quantize_u8
from rt_server.model.layers import (
    AdaIN1d,
    AdainResBlk1d,
    Int8Conv1d,
    WNConv1d,
    WNConvTranspose1d,
    sequence_mask,
)
from rt_server.model.styles import StyleAffines, StyleProjection

_log = logging.getLogger(__name__)

HARMONIC_NUM = 8
SINE_AMP = 0.1
NOISE_STD = 0.003
VOICED_THRESHOLD_HZ = 10.0


@dataclass(frozen=True)
class FrameGeometry:
    """Per-item lengths at each time resolution, and their masks (all `None` when nothing is padded)."""

    frames: Tensor  # [B] duration frames F
    n_fft: int
    hop: int
    upsample_rates: tuple[int, ...]
    padded: bool

    @property
    def samples(self) -> Tensor:
        return self.frames * 2 * math.prod(self.upsample_rates) * self.hop

    def lengths_at(self, scale: int, extra: int = 0) -> Tensor:
        """Lengths at `scale` positions per frame (2 for the F0 curve, 20 and 120 in the generator) + extra."""
        return self.frames * scale + extra

    def mask(self, scale: int, max_len: int, extra: int = 0) -> Tensor | None:
        if not self.padded:
            return None
        return sequence_mask(self.lengths_at(scale, extra), max_len)


class AdaINResBlock1(nn.Module):
    """Three dilated conv pairs with AdaIN and Snake activations (learned per-channel alpha)."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int], style_dim: int) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            [
                WNConv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
                for d in dilations
            ]
        )
        self.convs2 = nn.ModuleList(
            [WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations]
        )
        self.adain1 = nn.ModuleList([AdaIN1d(style_dim, channels) for _ in dilations])
        self.adain2 = nn.ModuleList([AdaIN1d(style_dim, channels) for _ in dilations])
        self.alpha1 = nn.ParameterList([nn.Parameter(torch.ones(1, channels, 1)) for _ in dilations])
        self.alpha2 = nn.ParameterList([nn.Parameter(torch.ones(1, channels, 1)) for _ in dilations])

        # Precision "int8" (`KModel.set_precision`): the convolutions as oneDNN int8 kernels, fed by `quantize`.
        self.int8: list[tuple[Int8Conv1d, Int8Conv1d]] | None = None
        self.quantize: Quantize = quantize_u8

    def use_int8(self, enabled: bool) -> None:
        """Run the convolutions in int8 (their weights quantised and packed now), or back in the float path."""
        self.int8 = None
        if enabled:
            pairs = zip(self.convs1, self.convs2, strict=True)
            self.int8 = [(Int8Conv1d(c1), Int8Conv1d(c2)) for c1, c2 in pairs]

    def forward(self, x: Tensor, s: Tensor | StyleAffines, mask: Tensor | None) -> Tensor:
        for k, (c1, c2, n1, n2, a1, a2) in enumerate(
            zip(self.convs1, self.convs2, self.adain1, self.adain2, self.alpha1, self.alpha2, strict=True)
        ):
            if self.int8 is None:
                xt = c1(n1(x, s, mask, a1))  # AdaIN + Snake, zero on the padding
                xt = c2(n2(xt, s, mask, a2))
            else:  # the padding's zeros quantise to the zero point exactly
                q1, q2 = self.int8[k]
                xt = q1(*self._quantized(n1(x, s, mask, a1)))
                xt = q2(*self._quantized(n2(xt, s, mask, a2)))
            x = xt + x
        return x

    def _quantized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.quantize is quantize_u8:
            return quantize_u8(x)
        try:
            return self.quantize(x)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # as for the compiled AdaIN kernel: eager from now on
            _log.warning("compiled quantiser failed, using the eager one from now on: %s: %s", type(exc).__name__, exc)
            self.quantize = quantize_u8
            return quantize_u8(x)


def _hann(n_fft: int, device: torch.device) -> Tensor:
    return torch.hann_window(n_fft, periodic=True, device=device)


def stft_magnitude_phase(x: Tensor, lengths: Tensor | None, n_fft: int, hop: int) -> tuple[Tensor, Tensor]:
    """`torch.stft(center=True, pad_mode='reflect')` per item: magnitude and phase, each [B, n_fft//2+1, N].

    Each item's signal is reflected at its own end (not at the padded batch's end), so an item's frames equal
    its single run's. Frames past an item's end are garbage; the caller masks them.
    """
    B, L = x.shape
    half = n_fft // 2
    index = torch.arange(-half, L + half, device=x.device)
    ends = (torch.full((B,), L, device=x.device) if lengths is None else lengths)[:, None] - 1
    reflected = index.abs()[None, :].expand(B, -1)
    reflected = torch.where(reflected > ends, 2 * ends - reflected, reflected).clamp(0, L - 1)
    padded = torch.gather(x, 1, reflected)
    frames = padded.unfold(-1, n_fft, hop) * _hann(n_fft, x.device)
    spectrum = torch.fft.rfft(frames, n=n_fft, dim=-1).transpose(1, 2)
    return spectrum.abs(), spectrum.angle()


def istft(magnitude: Tensor, phase: Tensor, frame_mask: Tensor | None, n_fft: int, hop: int) -> Tensor:
    """`torch.istft(center=True)` with a per-item window envelope. Returns [B, hop * (N - 1)] samples.

    Frames past an item's end are excluded from both its overlap-add and its window envelope, as if the item
    had been transformed alone.
    """
    spectrum = torch.polar(magnitude, phase) if frame_mask is None else torch.polar(magnitude, phase) * frame_mask
    B, _, N = spectrum.shape
    window = _hann(n_fft, magnitude.device)
    frames = torch.fft.irfft(spectrum, n=n_fft, dim=1) * window[None, :, None]
    total = n_fft + hop * (N - 1)
    fold = {"output_size": (1, total), "kernel_size": (1, n_fft), "stride": (1, hop)}
    signal = F.fold(frames, **fold).view(B, total)
    weights = (window * window)[None, :, None].expand(B, -1, N)
    if frame_mask is not None:
        weights = weights * frame_mask
    envelope = F.fold(weights, **fold).view(B, total)
    half = n_fft // 2
    signal, envelope = signal[:, half : total - half], envelope[:, half : total - half]
    return signal / torch.where(envelope > 1e-11, envelope, torch.ones_like(envelope))


class SourceModuleHnNSF(nn.Module):
    """Harmonic sine source (fundamental + 8 harmonics) merged by a Linear and tanh."""

    def __init__(self, upsample_scale: int) -> None:
        super().__init__()
        self.upsample_scale = upsample_scale
        self.l_linear = nn.Linear(HARMONIC_NUM + 1, 1)

    def forward(self, f0_up: Tensor, lengths: Tensor | None, noise: Sequence[Tensor | None]) -> Tensor:
        """f0_up: [B, L] in Hz at the sample rate (zero past each item's end). `noise[i]` is item i's
        standard-normal draw [L_i, 9] (or None: no additive noise). Returns the source [B, L]."""
        L = f0_up.shape[1]
        harmonics = torch.arange(1, HARMONIC_NUM + 2, device=f0_up.device, dtype=f0_up.dtype)
        fn = f0_up[:, :, None] * harmonics
        rad = (fn / SAMPLE_RATE_HZ) % 1
        scale = self.upsample_scale
        # The reference adds a random initial phase at sample 0, which the 1/300 linear downsampling never
        # reads (it samples positions 300k + 149.5); it is omitted here. Its RNG draw is replayed by the caller.
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / scale, mode="linear")
        phase = torch.cumsum(rad, dim=2) * 2 * torch.pi
        if lengths is not None:
            # Replicate each item's last phase into its padding: the upsampling below then clamps at the item's
            # own end, as it does for the item alone.
            last = (lengths // scale - 1)[:, None]
            index = torch.minimum(torch.arange(phase.shape[2], device=phase.device)[None, :], last)
            phase = torch.gather(phase, 2, index[:, None, :].expand(-1, phase.shape[1], -1))
        phase = F.interpolate(phase * scale, scale_factor=scale, mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * SINE_AMP
        uv = (f0_up > VOICED_THRESHOLD_HZ).to(sines.dtype)[:, :, None]
        waves = sines * uv
        if any(n is not None for n in noise):
            noise_amp = uv * NOISE_STD + (1 - uv) * SINE_AMP / 3
            draws = torch.zeros_like(waves)
            for i, item_noise in enumerate(noise):
                if item_noise is not None:
                    draws[i, : item_noise.shape[0]] = item_noise.to(draws.device, draws.dtype)
            waves = waves + noise_amp * draws
        source = torch.tanh(self.l_linear(waves)).squeeze(-1)
        if lengths is not None:
            source = source * (torch.arange(L, device=source.device)[None, :] < lengths[:, None])
        return source


class Generator(nn.Module):
    def __init__(self, style_dim: int, cfg: ISTFTNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.n_fft, self.hop = cfg.gen_istft_n_fft, cfg.gen_istft_hop_size
        self.m_source = SourceModuleHnNSF(math.prod(cfg.upsample_rates) * self.hop)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        self.noise_convs = nn.ModuleList()
        self.noise_res = nn.ModuleList()
        ch = cfg.upsample_initial_channel
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            out_ch = cfg.upsample_initial_channel // (2 ** (i + 1))
            self.ups.append(WNConvTranspose1d(ch, out_ch, kernel, stride=rate, padding=(kernel - rate) // 2))
            ch = out_ch
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
                self.resblocks.append(AdaINResBlock1(ch, k, d, style_dim))
            if i + 1 < len(cfg.upsample_rates):
                stride = math.prod(cfg.upsample_rates[i + 1 :])
                self.noise_convs.append(
                    nn.Conv1d(self.n_fft + 2, ch, stride * 2, stride=stride, padding=(stride + 1) // 2)
                )
                self.noise_res.append(AdaINResBlock1(ch, 7, (1, 3, 5), style_dim))
            else:
                self.noise_convs.append(nn.Conv1d(self.n_fft + 2, ch, 1))
                self.noise_res.append(AdaINResBlock1(ch, 11, (1, 3, 5), style_dim))
        self.conv_post = WNConv1d(ch, self.n_fft + 2, 7, padding=3)

    def forward(
        self, x: Tensor, s: Tensor | StyleAffines, f0: Tensor, geo: FrameGeometry, noise: Sequence[Tensor | None]
    ) -> Tensor:
        """x: [B, C, 2F]; f0: [B, 2F] in Hz (zero on padding). Returns audio [B, 600F]."""
        return self.synthesize(x, s, self.harmonic_source(f0, geo, noise).to(x.dtype), geo)

    def harmonic_source(self, f0: Tensor, geo: FrameGeometry, noise: Sequence[Tensor | None]) -> Tensor:
        """The sine source's STFT, magnitude and phase stacked: [B, n_fft + 2, 120F + 1] float32, frame j
        centred on sample `hop * j` (zero past each item's end). Frames [120a, 120b] of it are what
        `synthesize` needs for the audio of duration frames [a, b) (see `KModel` windows)."""
        samples_per_f0 = self.m_source.upsample_scale
        f0_up = f0.repeat_interleave(samples_per_f0, dim=1)  # nearest x300
        source = self.m_source(f0_up, geo.samples if geo.padded else None, noise)
        with torch.autocast(device_type=source.device.type, enabled=False):
            mag, phase = stft_magnitude_phase(source.float(), geo.samples if geo.padded else None, self.n_fft, self.hop)
        stft_mask = geo.mask(2 * math.prod(self.cfg.upsample_rates), mag.shape[-1], extra=1)
        return apply_mask(torch.cat([mag, phase], dim=1), stft_mask)

    def synthesize(self, x: Tensor, s: Tensor | StyleAffines, har: Tensor, geo: FrameGeometry) -> Tensor:
        """x: [B, C, 2F] decoder features; har: `harmonic_source` [B, n_fft + 2, 120F + 1] in x's dtype.
        Returns audio [B, 600F]."""
        n_frames = har.shape[-1]  # 120F + 1: one STFT frame per hop, plus the centred edge frame
        stft_mask = geo.mask(2 * math.prod(self.cfg.upsample_rates), n_frames, extra=1)
        # Packed weights: the blocks' convolutions leave channels last, and the inputs that do not are converted.
        packed = self.conv_post.packed_weight is not None
        scale = 2
        for i, rate in enumerate(self.cfg.upsample_rates):
            x = F.leaky_relu(x, 0.1)
            mask_in = geo.mask(scale, x.shape[-1])
            scale *= rate
            x_source = _channels_last(self.noise_convs[i](har), packed)
            last = i == len(self.cfg.upsample_rates) - 1
            mask_out = stft_mask if last else geo.mask(scale, x_source.shape[-1])
            x_source = self.noise_res[i](x_source, s, mask_out)
            x = self.ups[i](apply_mask(x, mask_in))
            if last:
                # Reflect-pad one position on the left: F.pad's reflect mode would leave autocast's dtype
                # (it runs in float32), and the whole last stage with it.
                x = _channels_last(torch.cat([x[..., 1:2], x], dim=-1), packed)
            x = apply_mask(x + x_source, mask_out)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            total = blocks[0](x, s, mask_out)
            for block in blocks[1:]:
                total = total + block(x, s, mask_out)
            x = total / self.num_kernels
        x = self.conv_post(apply_mask(F.leaky_relu(x), stft_mask))
        half = self.n_fft // 2 + 1
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            return istft(torch.exp(x[:, :half]), torch.sin(x[:, half:]), stft_mask, self.n_fft, self.hop)


def _channels_last(x: Tensor, enabled: bool) -> Tensor:
    """x [B, C, L] laid out as packed convolutions leave their output (channels last, a strided view), if
    `enabled`: the residual blocks add their convolutions' output to their input, and adding two layouts took
    four times as long as adding one on this project's CPU (0.85 against 0.21 ms at 128 x 3841, bf16)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if enabled else x


class Decoder(nn.Module):
    def __init__(self, dim_in: int, style_dim: int, width: int, asr_res_dim: int, cfg: ISTFTNetConfig) -> None:
        super().__init__()
        self.encode = AdainResBlk1d(dim_in + 2, width, style_dim)
        cat_dim = width + 2 + asr_res_dim
        self.decode = nn.ModuleList(
            [AdainResBlk1d(cat_dim, width, style_dim) for _ in range(3)]
            + [AdainResBlk1d(cat_dim, cfg.upsample_initial_channel, style_dim, upsample=True)]
        )
        self.F0_conv = WNConv1d(1, 1, 3, stride=2, padding=1)
        self.N_conv = WNConv1d(1, 1, 3, stride=2, padding=1)
        self.asr_res = nn.Sequential(WNConv1d(dim_in, asr_res_dim, 1))
        self.generator = Generator(style_dim, cfg)
        self.styles: StyleProjection | None = None  # the fused layers' projections, stacked: `project_styles`

    def project_styles(self, enabled: bool) -> None:
        """Stack the style projections of the fused AdaIN layers (reduced precision) into one product, now
        (`StyleProjection`: rebuild after changing their weights), or drop the stack."""
        self.styles = None
        layers = [m for m in self.modules() if isinstance(m, AdaIN1d) and m.fused]
        if enabled and layers:
            self.styles = StyleProjection(layers)

    def style_affines(self, s: Tensor) -> Tensor | StyleAffines:
        """What the decoder's layers take as their style: the fused layers' affines computed at once when they
        are stacked, otherwise the style vectors [B, style_dim] themselves."""
        return s if self.styles is None else self.styles(s)

    def forward(
        self,
        asr: Tensor,
        f0_curve: Tensor,
        n_curve: Tensor,
        s: Tensor,
        geo: FrameGeometry,
        noise: Sequence[Tensor | None],
    ) -> Tensor:
        """asr: [B, C, F]; curves: [B, 2F] (zero on padding). Returns audio [B, 600F]."""
        styles = self.style_affines(s)
        return self.generator(self.features(asr, f0_curve, n_curve, styles, geo), styles, f0_curve, geo, noise)

    def features(
        self, asr: Tensor, f0_curve: Tensor, n_curve: Tensor, s: Tensor | StyleAffines, geo: FrameGeometry
    ) -> Tensor:
        """The generator's input [B, C, 2F] (zero on padding): the AdaIN residual stacks at frame rate."""
        mask = geo.mask(1, asr.shape[-1])
        mask2 = geo.mask(2, f0_curve.shape[-1])
        f0 = apply_mask(self.F0_conv(f0_curve[:, None]), mask)
        n = apply_mask(self.N_conv(n_curve[:, None]), mask)
        x = self.encode(torch.cat([asr, f0, n], dim=1), s, mask, mask)
        asr_res = self.asr_res(asr)
        upsampled = False
        for block in self.decode:
            assert isinstance(block, AdainResBlk1d)
            if not upsampled:
                x = torch.cat([x, asr_res, f0, n], dim=1)
            x = block(x, s, mask, mask2 if block.upsample else mask)
            upsampled = upsampled or block.upsample
        return apply_mask(x, mask2)
