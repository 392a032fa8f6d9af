"""The phoneme-level ALBERT ("PL-BERT") of Kokoro: one shared transformer layer applied N times.

Parameter names follow `transformers.AlbertModel`, which the published checkpoint's `bert` section uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rt_server.model.config import PLBertConfig
from rt_server.model.layers import PackableLinear


def gelu_new(x: Tensor) -> Tensor:
    """ALBERT's "gelu_new": the tanh approximation of GELU, evaluated term by term as the reference does
    (`F.gelu(approximate="tanh")` differs in the last bits)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class AlbertEmbeddings(nn.Module):
    def __init__(self, config: PLBertConfig, vocab_size: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, config.embedding_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        self.LayerNorm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        # Same summation order as the reference: word + token type, then position.
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings(positions)[None]
        return self.LayerNorm(x)


class AlbertAttention(nn.Module):
    def __init__(self, config: PLBertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = PackableLinear(hidden, hidden)
        self.key = PackableLinear(hidden, hidden)
        self.value = PackableLinear(hidden, hidden)
        self.dense = PackableLinear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        B, T, H = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=key_mask
        )
        context = context.transpose(1, 2).reshape(B, T, H)
        return self.LayerNorm(x + self.dense(context))


class AlbertLayer(nn.Module):
    def __init__(self, config: PLBertConfig) -> None:
        super().__init__()
        self.attention = AlbertAttention(config)
        self.ffn = PackableLinear(config.hidden_size, config.intermediate_size)
        self.ffn_output = PackableLinear(config.intermediate_size, config.hidden_size)
        self.full_layer_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        attended = self.attention(x, key_mask)
        ffn = self.ffn_output(gelu_new(self.ffn(attended)))
        return self.full_layer_layer_norm(ffn + attended)


class AlbertLayerGroup(nn.Module):
    def __init__(self, config: PLBertConfig) -> None:
        super().__init__()
        self.albert_layers = nn.ModuleList([AlbertLayer(config)])


class AlbertEncoder(nn.Module):
    def __init__(self, config: PLBertConfig) -> None:
        super().__init__()
        self.num_hidden_layers = config.num_hidden_layers
        self.embedding_hidden_mapping_in = PackableLinear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList([AlbertLayerGroup(config)])

    def forward(self, x: Tensor, key_mask: Tensor | None, after_layer: Callable[[], None] | None = None) -> Tensor:
        x = self.embedding_hidden_mapping_in(x)
        group = self.albert_layer_groups[0]
        assert isinstance(group, AlbertLayerGroup)
        layer = group.albert_layers[0]  # ALBERT shares one layer across its whole depth
        for _ in range(self.num_hidden_layers):
            x = layer(x, key_mask)
            if after_layer is not None:
                after_layer()
        return x


class CustomAlbert(nn.Module):
    """ALBERT returning the last hidden state [B, T, H]. The pooler exists for the checkpoint only."""

    def __init__(self, config: PLBertConfig, vocab_size: int) -> None:
        super().__init__()
        self.embeddings = AlbertEmbeddings(config, vocab_size)
        self.encoder = AlbertEncoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, input_ids: Tensor, lengths: Tensor | None, after_layer: Callable[[], None] | None = None
    ) -> Tensor:
        """`after_layer()` runs after each of the encoder's layers (a caller's chance to stop it by raising)."""
        key_mask = None
        if lengths is not None:
            T = input_ids.shape[1]
            valid = torch.arange(T, device=input_ids.device)[None, :] < lengths[:, None]
            key_mask = valid[:, None, None, :]  # [B, 1, 1, T]: padded keys are never attended to
        return self.encoder(self.embeddings(input_ids), key_mask, after_layer)
