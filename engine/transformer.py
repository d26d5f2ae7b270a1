"""A small causal transformer language model (pre-norm GPT blocks).

Shapes: tokens [B, T] -> hidden [B, T, H] -> logits [B, T, V]. The output head is an
``nn.Linear`` whose weight is tied to the token embedding; with ``model.fused_head`` the
training forward hands hidden [B*T, H] and that weight to the fused linear cross-entropy, so the
[B*T, V] logits (the largest activation of a large-vocabulary model) never exist.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError
from engine.dataset import DataInfo
from engine.head import HeadModel


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ConfigError(f"model.hidden={width} must be divisible by model.heads={heads}.")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, h)))
        return x + self.drop(self.mlp(self.norm2(x)))


class Trunk(nn.Module):
    """Token + position embeddings, the blocks, a final norm: everything but the head."""

    def __init__(self, vocab: int, seq_len: int, cfg: Any):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.hidden)
        self.position = nn.Parameter(torch.zeros(seq_len, cfg.hidden))
        self.blocks = nn.ModuleList(
            Block(cfg.hidden, cfg.heads, cfg.dropout) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build_transformer(cfg: Any, info: DataInfo) -> HeadModel:
    if info.task != "lm":
        raise ConfigError(
            "model=transformer is a language model: use it with data=text (token sequences); "
            "for tables use model=mlp."
        )
    trunk = Trunk(info.num_classes, info.num_features, cfg)
    head = nn.Linear(cfg.hidden, info.num_classes, bias=False)
    head.weight = trunk.embed.weight  # tied: one [V, H] matrix for input and output
    return HeadModel(trunk, head, regression=False)
