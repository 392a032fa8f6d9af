"""Kokoro v1.0 configuration: the published `config.json`, validated, plus a tiny test configuration.

The published config carries fields the model never reads (`dim_in`, `max_conv_dim`, `multispeaker`,
`n_mels`); they are accepted and ignored. The sample rate is not in the config: Kokoro hard-codes 24 kHz.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

SAMPLE_RATE_HZ = 24_000
# One predicted duration frame is 600 samples (25 ms): the decoder upsamples 2x, the generator 10x6x, iSTFT hop 5.
SAMPLES_PER_FRAME = 600
# ALBERT has 512 positions; two of them hold the boundary 0-tokens.
MAX_PHONEMES = 510
PAD_TOKEN_ID = 0

_BUNDLED_CONFIG = "kokoro-v1.0-config.json"


@dataclass(frozen=True)
class PLBertConfig:
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    num_hidden_layers: int
    embedding_size: int = 128  # ALBERT default; not in the Kokoro config
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2


@dataclass(frozen=True)
class ISTFTNetConfig:
    upsample_kernel_sizes: tuple[int, ...]
    upsample_rates: tuple[int, ...]
    gen_istft_hop_size: int
    gen_istft_n_fft: int
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    resblock_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int


@dataclass(frozen=True)
class KokoroConfig:
    """The fields KModel uses. `decoder_width` scales the decoder's fixed 1024/64 channels for tiny configs."""

    vocab: dict[str, int]
    n_token: int
    hidden_dim: int
    style_dim: int
    n_layer: int
    max_dur: int
    text_encoder_kernel_size: int
    plbert: PLBertConfig
    istftnet: ISTFTNetConfig
    decoder_width: int = 1024  # the reference hard-codes 1024 (encode/decode) and 64 (asr_res)
    asr_res_dim: int = 64

    @property
    def max_phonemes(self) -> int:
        return self.plbert.max_position_embeddings - 2


class ConfigError(ValueError):
    """A configuration file or dict is not a valid Kokoro config."""


def _require(raw: dict[str, Any], key: str) -> Any:
    if key not in raw:
        raise ConfigError(f"config is missing required field {key!r}")
    return raw[key]


def config_from_dict(raw: dict[str, Any]) -> KokoroConfig:
    """Validate a config dict (the published `config.json` layout) and build a `KokoroConfig`."""
    vocab = _require(raw, "vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConfigError("config field 'vocab' must be a non-empty object of symbol -> id")
    n_token = int(_require(raw, "n_token"))
    for symbol, token_id in vocab.items():
        if not isinstance(symbol, str) or len(symbol) != 1:
            raise ConfigError(f"vocab symbol {symbol!r} must be exactly one code point")
        if not isinstance(token_id, int) or not 0 < token_id < n_token:
            raise ConfigError(f"vocab id for {symbol!r} must be an int in 1..{n_token - 1}, got {token_id!r}")
    pl = _require(raw, "plbert")
    it = _require(raw, "istftnet")
    try:
        plbert = PLBertConfig(
            hidden_size=int(pl["hidden_size"]),
            num_attention_heads=int(pl["num_attention_heads"]),
            intermediate_size=int(pl["intermediate_size"]),
            max_position_embeddings=int(pl["max_position_embeddings"]),
            num_hidden_layers=int(pl["num_hidden_layers"]),
            embedding_size=int(pl.get("embedding_size", 128)),
        )
        istftnet = ISTFTNetConfig(
            upsample_kernel_sizes=tuple(int(k) for k in it["upsample_kernel_sizes"]),
            upsample_rates=tuple(int(r) for r in it["upsample_rates"]),
            gen_istft_hop_size=int(it["gen_istft_hop_size"]),
            gen_istft_n_fft=int(it["gen_istft_n_fft"]),
            resblock_dilation_sizes=tuple(tuple(int(d) for d in ds) for ds in it["resblock_dilation_sizes"]),
            resblock_kernel_sizes=tuple(int(k) for k in it["resblock_kernel_sizes"]),
            upsample_initial_channel=int(it["upsample_initial_channel"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"invalid plbert/istftnet section: {exc!r}") from exc
    hop = istftnet.gen_istft_hop_size
    upsample = 2 * hop
    for rate in istftnet.upsample_rates:
        upsample *= rate
    if upsample != SAMPLES_PER_FRAME:
        raise ConfigError(f"2 x upsample_rates x hop must be {SAMPLES_PER_FRAME} samples per frame, got {upsample}")
    return KokoroConfig(
        vocab=dict(vocab),
        n_token=n_token,
        hidden_dim=int(_require(raw, "hidden_dim")),
        style_dim=int(_require(raw, "style_dim")),
        n_layer=int(_require(raw, "n_layer")),
        max_dur=int(_require(raw, "max_dur")),
        text_encoder_kernel_size=int(_require(raw, "text_encoder_kernel_size")),
        plbert=plbert,
        istftnet=istftnet,
        decoder_width=int(raw.get("decoder_width", 1024)),
        asr_res_dim=int(raw.get("asr_res_dim", 64)),
    )


def bundled_config_dict() -> dict[str, Any]:
    """The published Kokoro v1.0 config.json shipped as package data."""
    text = resources.files(__package__).joinpath(_BUNDLED_CONFIG).read_text(encoding="utf-8")
    raw: dict[str, Any] = json.loads(text)
    return raw


def load_config(source: str | Path | dict[str, Any] | KokoroConfig | None = None) -> KokoroConfig:
    """Load a config from a path, a dict, or (None) the bundled v1.0 config."""
    if isinstance(source, KokoroConfig):
        return source
    if source is None:
        return config_from_dict(bundled_config_dict())
    if isinstance(source, dict):
        return config_from_dict(source)
    path = Path(source)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a JSON object")
    return config_from_dict(raw)


def tiny_config_dict() -> dict[str, Any]:
    """A tiny configuration with the real vocabulary and frame geometry, for fast tests with random weights.

    Every layer type of the full model is present; only widths and depths shrink. The istftnet geometry is the
    real one, so audio is still 600 samples per frame at 24 kHz.
    """
    raw = bundled_config_dict()
    raw.update(
        hidden_dim=32,
        style_dim=128,  # voice packs are 256 wide (2 x style_dim) for every config
        n_layer=2,
        decoder_width=48,
        asr_res_dim=8,
        plbert={
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
            "num_hidden_layers": 2,
            "embedding_size": 16,
        },
    )
    raw["istftnet"] = dict(raw["istftnet"], upsample_initial_channel=32)
    return raw
