"""A language model's loss and perplexity on a split: mean next-token cross-entropy over every
token, streamed in batches (the logits of a whole split would not fit in memory)."""

from __future__ import annotations

from typing import Any

import torch

from engine.predictor import Predictor


def metrics(predictor: Predictor, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, Any]:
    total, hits, tokens = 0.0, 0, 0
    for i in range(0, len(x), batch):
        logits = predictor.outputs(x[i : i + batch]).double()  # [B, T, V]
        target = y[i : i + batch].reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1])
        total += float(torch.nn.functional.cross_entropy(flat, target, reduction="sum"))
        hits += int((flat.argmax(-1) == target).sum())
        tokens += target.numel()
    loss = total / max(tokens, 1)
    derived = predictor.task.derived("eval", {"eval/loss": loss})
    return {
        "sequences": int(len(x)),
        "tokens": tokens,
        "loss": loss,
        "perplexity": derived["eval/perplexity"],
        "token_accuracy": hits / max(tokens, 1),
    }


def scalars(m: dict[str, Any]) -> dict[str, float]:
    return {"loss": m["loss"], "perplexity": m["perplexity"], "token_accuracy": m["token_accuracy"]}
