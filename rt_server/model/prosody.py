"""Prosody predictor (durations, F0 and energy) and the text encoder.

Shapes: B batch, T tokens (with the two boundary tokens), F duration frames. Masks are float [B, 1, L] with 1.0 on
an item's own positions; `None` means the batch is not padded.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rt_server.model.kernels import apply_mask
from rt_server.model.layers import (
    LEAKY_SLOPE,
    AdainResBlk1d,
    AdaLayerNorm,
    ChannelLayerNorm,
    WNConv1d,
    run_lstm,
)


def _lstm(in_dim: int, hidden: int) -> nn.LSTM:
    return nn.LSTM(in_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)


class DurationEncoder(nn.Module):
    """Alternating BiLSTM / AdaLayerNorm stack; style re-appended after every norm. Output [B, T, d + style]."""

    def __init__(self, style_dim: int, d_model: int, n_layers: int) -> None:
        super().__init__()
        self.lstms = nn.ModuleList()
        for _ in range(n_layers):
            self.lstms.append(_lstm(d_model + style_dim, d_model // 2))
            self.lstms.append(AdaLayerNorm(style_dim, d_model))

    def forward(self, x: Tensor, style: Tensor, lengths: Tensor | None, mask: Tensor | None) -> Tensor:
        """x: [B, d_model, T]; mask: [B, 1, T]."""
        T = x.shape[-1]
        s = style[:, None, :].expand(-1, T, -1)
        keep = None if mask is None else mask.transpose(1, 2)  # [B, T, 1]
        h = apply_mask(torch.cat([x.transpose(1, 2), s], dim=-1), keep)
        for block in self.lstms:
            if isinstance(block, AdaLayerNorm):
                h = apply_mask(torch.cat([block(h, style), s], dim=-1), keep)
            else:
                assert isinstance(block, nn.LSTM)
                h = run_lstm(block, h, lengths)
        return h


class ProsodyPredictor(nn.Module):
    def __init__(self, style_dim: int, d_hid: int, n_layers: int, max_dur: int) -> None:
        super().__init__()
        self.text_encoder = DurationEncoder(style_dim, d_hid, n_layers)
        self.lstm = _lstm(d_hid + style_dim, d_hid // 2)
        self.duration_proj = LinearNorm(d_hid, max_dur)
        self.shared = _lstm(d_hid + style_dim, d_hid // 2)
        self.F0 = nn.ModuleList(
            [
                AdainResBlk1d(d_hid, d_hid, style_dim),
                AdainResBlk1d(d_hid, d_hid // 2, style_dim, upsample=True),
                AdainResBlk1d(d_hid // 2, d_hid // 2, style_dim),
            ]
        )
        self.N = nn.ModuleList(
            [
                AdainResBlk1d(d_hid, d_hid, style_dim),
                AdainResBlk1d(d_hid, d_hid // 2, style_dim, upsample=True),
                AdainResBlk1d(d_hid // 2, d_hid // 2, style_dim),
            ]
        )
        self.F0_proj = nn.Conv1d(d_hid // 2, 1, 1)
        self.N_proj = nn.Conv1d(d_hid // 2, 1, 1)

    def durations(self, d: Tensor, speed: Tensor, lengths: Tensor | None) -> Tensor:
        """Continuous durations in frames, [B, T]: sum of 50 sigmoids, divided by the item's speed."""
        x = run_lstm(self.lstm, d, lengths)
        return torch.sigmoid(self.duration_proj(x)).sum(dim=-1) / speed[:, None]

    def f0_energy(
        self,
        en: Tensor,
        style: Tensor,
        frame_lengths: Tensor | None,
        mask: Tensor | None,
        mask2: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """en: [B, C, F] frame-expanded features. Returns F0 (Hz) and energy curves, each [B, 2F], zero on padding."""
        x = run_lstm(self.shared, en.transpose(1, 2), frame_lengths).transpose(1, 2)
        curves = []
        for blocks, proj in ((self.F0, self.F0_proj), (self.N, self.N_proj)):
            h, m = x, mask
            for block in blocks:
                out_mask = mask2 if block.upsample else m
                h = block(h, style, m, out_mask)
                m = out_mask
            curves.append(apply_mask(proj(h), mask2).squeeze(1))
        return curves[0], curves[1]


class LinearNorm(nn.Module):
    """A Linear kept under `linear_layer` for the checkpoint's key names."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_layer = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_layer(x)


class TextEncoder(nn.Module):
    """Embedding, three masked conv blocks (WN conv, channel layer norm, leaky ReLU), packed BiLSTM."""

    def __init__(self, channels: int, kernel_size: int, depth: int, n_symbols: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_symbols, channels)
        padding = (kernel_size - 1) // 2
        self.cnn = nn.ModuleList(
            [
                nn.Sequential(
                    WNConv1d(channels, channels, kernel_size, padding=padding),
                    ChannelLayerNorm(channels),
                    nn.LeakyReLU(LEAKY_SLOPE),
                )
                for _ in range(depth)
            ]
        )
        self.lstm = _lstm(channels, channels // 2)

    def forward(self, input_ids: Tensor, lengths: Tensor | None, mask: Tensor | None) -> Tensor:
        """Returns [B, channels, T], zero on padding."""
        x = apply_mask(self.embedding(input_ids).transpose(1, 2), mask)
        for block in self.cnn:
            x = apply_mask(block(x), mask)
        x = run_lstm(self.lstm, x.transpose(1, 2), lengths).transpose(1, 2)
        return apply_mask(x, mask)


def expand_to_frames(x: Tensor, frame_tokens: Tensor) -> Tensor:
    """Hard monotonic alignment: x [B, C, T] -> [B, C, F] by each frame's token index [B, F].

    Equal to the reference's `x @ one_hot_alignment` (a sum of one term), but a gather.
    """
    index = frame_tokens[:, None, :].expand(-1, x.shape[1], -1)
    return torch.gather(x, 2, index)
