"""The published Kokoro v1.0 checkpoint layout: every key and shape of `kokoro-v1_0.pth`, derived from the
config.

The official file is a dict of five state dicts (`bert`, `bert_encoder`, `predictor`, `text_encoder`,
`decoder`) whose keys all start with `module.` (it was saved from DataParallel wrappers) and whose
weight-normed layers use the old `weight_g`/`weight_v` names. For the v1.0 config this yields 548 tensors and
81,763,410 values. The 140 InstanceNorm affine tensors of the AdaIN layers exist in the model but not in the
file (identity there).

Pure Python: no torch, no numpy. The layout is written out from the model description so that the converter
and its tests have an expectation that does not come from the converter's own output.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]

TOP_LEVEL_KEYS: tuple[str, ...] = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
KEY_PREFIX = "module."


@dataclass(frozen=True)
class ModelLayout:
    """Expected checkpoint tensors plus the model-only tensors the checkpoint omits."""

    checkpoint: dict[str, dict[str, Shape]]  # top-level key -> state-dict key (with `module.`) -> shape
    instance_norm_affine: dict[str, dict[str, Shape]]  # same form; in the model, absent from the file

    def checkpoint_items(self) -> Iterator[tuple[str, str, Shape]]:
        for top, keys in self.checkpoint.items():
            for key, shape in keys.items():
                yield top, key, shape


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def count_values(shapes: Mapping[str, Mapping[str, Shape]]) -> int:
    return sum(_numel(s) for keys in shapes.values() for s in keys.values())


def count_tensors(shapes: Mapping[str, Mapping[str, Shape]]) -> int:
    return sum(len(keys) for keys in shapes.values())


class _Builder:
    def __init__(self) -> None:
        self.keys: dict[str, Shape] = {}
        self.affine: dict[str, Shape] = {}

    def add(self, name: str, shape: Shape) -> None:
        key = KEY_PREFIX + name
        if key in self.keys:
            raise AssertionError(f"duplicate key {key}")
        self.keys[key] = shape

    def linear(self, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        self.add(f"{name}.weight", (n_out, n_in))
        if bias:
            self.add(f"{name}.bias", (n_out,))

    def norm(self, name: str, dim: int, weight: str = "weight", bias: str = "bias") -> None:
        self.add(f"{name}.{weight}", (dim,))
        self.add(f"{name}.{bias}", (dim,))

    def conv(self, name: str, c_in: int, c_out: int, k: int, *, wn: bool, bias: bool = True) -> None:
        if wn:
            self.add(f"{name}.weight_g", (c_out, 1, 1))
            self.add(f"{name}.weight_v", (c_out, c_in, k))
        else:
            self.add(f"{name}.weight", (c_out, c_in, k))
        if bias:
            self.add(f"{name}.bias", (c_out,))

    def conv_transpose_wn(self, name: str, c_in: int, c_out_per_group: int, k: int, c_bias: int) -> None:
        # ConvTranspose weights are [in, out/groups, k]; weight norm's dim 0 is the *input* channel.
        self.add(f"{name}.weight_g", (c_in, 1, 1))
        self.add(f"{name}.weight_v", (c_in, c_out_per_group, k))
        self.add(f"{name}.bias", (c_bias,))

    def lstm(self, name: str, n_in: int, hidden: int) -> None:
        for suffix in ("", "_reverse"):
            self.add(f"{name}.weight_ih_l0{suffix}", (4 * hidden, n_in))
            self.add(f"{name}.weight_hh_l0{suffix}", (4 * hidden, hidden))
            self.add(f"{name}.bias_ih_l0{suffix}", (4 * hidden,))
            self.add(f"{name}.bias_hh_l0{suffix}", (4 * hidden,))

    def adain(self, name: str, style_dim: int, channels: int) -> None:
        self.linear(f"{name}.fc", style_dim, 2 * channels)
        self.affine[f"{KEY_PREFIX}{name}.norm.weight"] = (channels,)
        self.affine[f"{KEY_PREFIX}{name}.norm.bias"] = (channels,)

    def adain_res_blk(self, name: str, style_dim: int, c_in: int, c_out: int, upsample: bool = False) -> None:
        self.adain(f"{name}.norm1", style_dim, c_in)
        self.adain(f"{name}.norm2", style_dim, c_out)
        self.conv(f"{name}.conv1", c_in, c_out, 3, wn=True)
        self.conv(f"{name}.conv2", c_out, c_out, 3, wn=True)
        if c_in != c_out:
            self.conv(f"{name}.conv1x1", c_in, c_out, 1, wn=True, bias=False)
        if upsample:
            self.conv_transpose_wn(f"{name}.pool", c_in, 1, 3, c_in)  # depthwise: groups = c_in

    def adain_res_block1(self, name: str, style_dim: int, channels: int, k: int) -> None:
        for i in range(3):
            self.conv(f"{name}.convs1.{i}", channels, channels, k, wn=True)
        for i in range(3):
            self.conv(f"{name}.convs2.{i}", channels, channels, k, wn=True)
        for i in range(3):
            self.adain(f"{name}.adain1.{i}", style_dim, channels)
        for i in range(3):
            self.adain(f"{name}.adain2.{i}", style_dim, channels)
        for i in range(3):
            self.add(f"{name}.alpha1.{i}", (1, channels, 1))
        for i in range(3):
            self.add(f"{name}.alpha2.{i}", (1, channels, 1))


def _bert(cfg: Mapping[str, Any]) -> _Builder:
    pl = cfg["plbert"]
    hidden, inter, emb = (
        int(pl["hidden_size"]),
        int(pl["intermediate_size"]),
        int(pl.get("embedding_size", 128)),
    )
    b = _Builder()
    b.add("embeddings.word_embeddings.weight", (int(cfg["n_token"]), emb))
    b.add("embeddings.position_embeddings.weight", (int(pl["max_position_embeddings"]), emb))
    b.add("embeddings.token_type_embeddings.weight", (2, emb))
    b.norm("embeddings.LayerNorm", emb)
    b.linear("encoder.embedding_hidden_mapping_in", emb, hidden)
    layer = "encoder.albert_layer_groups.0.albert_layers.0"
    b.norm(f"{layer}.full_layer_layer_norm", hidden)
    for proj in ("query", "key", "value", "dense"):
        b.linear(f"{layer}.attention.{proj}", hidden, hidden)
    b.norm(f"{layer}.attention.LayerNorm", hidden)
    b.linear(f"{layer}.ffn", hidden, inter)
    b.linear(f"{layer}.ffn_output", inter, hidden)
    b.linear("pooler", hidden, hidden)
    return b


def _predictor(cfg: Mapping[str, Any]) -> _Builder:
    d, sty, n_layer = int(cfg["hidden_dim"]), int(cfg["style_dim"]), int(cfg["n_layer"])
    b = _Builder()
    for i in range(n_layer):
        b.lstm(f"text_encoder.lstms.{2 * i}", d + sty, d // 2)
        b.linear(f"text_encoder.lstms.{2 * i + 1}.fc", sty, 2 * d)
    b.lstm("lstm", d + sty, d // 2)
    b.linear("duration_proj.linear_layer", d, int(cfg["max_dur"]))
    b.lstm("shared", d + sty, d // 2)
    for branch in ("F0", "N"):
        b.adain_res_blk(f"{branch}.0", sty, d, d)
        b.adain_res_blk(f"{branch}.1", sty, d, d // 2, upsample=True)
        b.adain_res_blk(f"{branch}.2", sty, d // 2, d // 2)
        b.conv(f"{branch}_proj", d // 2, 1, 1, wn=False)
    return b


def _text_encoder(cfg: Mapping[str, Any]) -> _Builder:
    d, k = int(cfg["hidden_dim"]), int(cfg["text_encoder_kernel_size"])
    b = _Builder()
    b.add("embedding.weight", (int(cfg["n_token"]), d))
    for i in range(3):
        b.conv(f"cnn.{i}.0", d, d, k, wn=True)
        b.norm(f"cnn.{i}.1", d, weight="gamma", bias="beta")
    b.lstm("lstm", d, d // 2)
    return b


def _decoder(cfg: Mapping[str, Any]) -> _Builder:
    d, sty = int(cfg["hidden_dim"]), int(cfg["style_dim"])
    width, asr = int(cfg.get("decoder_width", 1024)), int(cfg.get("asr_res_dim", 64))
    it = cfg["istftnet"]
    b = _Builder()
    b.adain_res_blk("encode", sty, d + 2, width)
    for i in range(3):
        b.adain_res_blk(f"decode.{i}", sty, width + 2 + asr, width)
    b.adain_res_blk("decode.3", sty, width + 2 + asr, d, upsample=True)
    b.conv("F0_conv", 1, 1, 3, wn=True)
    b.conv("N_conv", 1, 1, 3, wn=True)
    b.conv("asr_res.0", d, asr, 1, wn=True)
    g = "generator"
    harmonics = 9
    b.linear(f"{g}.m_source.l_linear", harmonics, 1)
    n_fft = int(it["gen_istft_n_fft"])
    ch = int(it["upsample_initial_channel"])
    rates = [int(r) for r in it["upsample_rates"]]
    kernels = [int(k) for k in it["upsample_kernel_sizes"]]
    res_kernels = [int(k) for k in it["resblock_kernel_sizes"]]
    for i, k in enumerate(kernels):
        b.conv_transpose_wn(f"{g}.ups.{i}", ch // 2**i, ch // 2 ** (i + 1), k, ch // 2 ** (i + 1))
    for i in range(len(kernels)):
        for j, k in enumerate(res_kernels):
            b.adain_res_block1(f"{g}.resblocks.{i * len(res_kernels) + j}", sty, ch // 2 ** (i + 1), k)
    for i in range(len(kernels)):
        c_cur = ch // 2 ** (i + 1)
        if i + 1 < len(rates):
            stride = 1
            for r in rates[i + 1 :]:
                stride *= r
            b.conv(f"{g}.noise_convs.{i}", n_fft + 2, c_cur, stride * 2, wn=False)
            b.adain_res_block1(f"{g}.noise_res.{i}", sty, c_cur, 7)
        else:
            b.conv(f"{g}.noise_convs.{i}", n_fft + 2, c_cur, 1, wn=False)
            b.adain_res_block1(f"{g}.noise_res.{i}", sty, c_cur, 11)
    b.conv(f"{g}.conv_post", ch // 2 ** len(kernels), n_fft + 2, 7, wn=True)
    return b


def model_layout(cfg: Mapping[str, Any]) -> ModelLayout:
    """Every checkpoint key and shape for a config dict in the published `config.json` layout."""
    bert = _bert(cfg)
    bert_encoder = _Builder()
    bert_encoder.linear("", int(cfg["plbert"]["hidden_size"]), int(cfg["hidden_dim"]))
    # `module.` + ".weight" from linear("") -> "module..weight"; the real keys are
    # "module.weight"/"module.bias".
    bert_encoder.keys = {k.replace("module..", "module."): v for k, v in bert_encoder.keys.items()}
    parts = {
        "bert": bert,
        "bert_encoder": bert_encoder,
        "predictor": _predictor(cfg),
        "text_encoder": _text_encoder(cfg),
        "decoder": _decoder(cfg),
    }
    return ModelLayout(
        checkpoint={top: parts[top].keys for top in TOP_LEVEL_KEYS},
        instance_norm_affine={top: parts[top].affine for top in TOP_LEVEL_KEYS},
    )
