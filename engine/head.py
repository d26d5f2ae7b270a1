"""The shape every model has: ``head(body(x))``, with ``head`` an ``nn.Linear``.

The loss can then take the last hidden state and the head weight straight into the fused linear
cross-entropy, never holding the full [N, C] logits (engine/losses.py); ``forward`` still returns
logits, for evaluation. Its own module so that every model family (engine/models.py,
engine/transformer.py) builds on it without importing the others.
"""

from __future__ import annotations

import torch
from torch import nn


class HeadModel(nn.Module):
    """``body`` maps inputs to a hidden state [..., H]; ``head`` maps it to outputs [..., C]."""

    body: nn.Module
    head: nn.Linear

    def __init__(self, body: nn.Module, head: nn.Linear, regression: bool):
        super().__init__()
        self.body = body
        self.head = head
        self.regression = regression

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, head_loss=None):
        hidden = self.body(x)
        if head_loss is not None:  # fused training path: the loss never sees full logits
            return head_loss(hidden, self.head.weight, self.head.bias, target)
        out = self.head(hidden)
        return out.squeeze(-1) if self.regression else out
