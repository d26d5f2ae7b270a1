"""data=text + model=transformer: the language-modelling workload behind the fused loss."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from engine.config import DataConfig, LossConfig, ModelConfig
from engine.losses import Objective
from engine.models import build_model
from engine.text import EOS, UNK, build_text_dataset

TINY = dict(
    name="text", vocab_size=512, seq_len=16, max_tokens=20000, val_fraction=0.1, test_fraction=0.1
)


def text_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), TINY, overrides)


def test_text_dataset_shifts_targets_by_one_token_and_learns_its_vocabulary():
    ds = build_text_dataset(text_cfg())
    vocab = ds.info.extra["vocab"]
    assert vocab[:2] == [UNK, EOS] and len(vocab) == 512 == ds.info.num_classes
    x, y = ds.train.x, ds.train.y
    assert x.shape[1] == 16 and x.dtype == torch.int64
    assert torch.equal(x[0, 1:], y[0, :-1])  # y is x moved one token on
    assert torch.equal(y[0, -1], x[1, 0])  # sequences are consecutive
    assert int(x.max()) < 512


def test_text_dataset_is_the_same_on_every_build():
    a, b = build_text_dataset(text_cfg()), build_text_dataset(text_cfg())
    assert torch.equal(a.train.x, b.train.x) and a.info.extra["vocab"] == b.info.extra["vocab"]


def test_fused_head_loss_and_gradients_equal_the_unfused_ones():
    ds = build_text_dataset(text_cfg())
    model_cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        {"name": "transformer", "hidden": 32, "depth": 1, "heads": 2},
    )
    torch.manual_seed(0)
    model = build_model(model_cfg, ds.info)
    x, y = ds.train.x[:8], ds.train.y[:8]
    results = []
    for fused in (True, False):
        loss_cfg = OmegaConf.merge(OmegaConf.structured(LossConfig), {"fused": fused})
        objective = Objective(loss_cfg, ds.info, fused_head=fused)
        model.zero_grad()
        loss = objective(model, x, y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_language_model_trains_through_the_cli_and_reports_perplexity(cli, tmp_path):
    run_dir = tmp_path / "lm"
    result = cli(
        "data=text",
        "model=transformer",
        "trainer.max_epochs=1",
        "data.max_tokens=30000",
        "data.vocab_size=1024",
        "model.hidden=32",
        "trainer.device=cpu",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/perplexity"] == pytest.approx(
        torch.tensor(metrics["val/loss"]).exp().item(), rel=1e-4
    )
    assert metrics["test/perplexity"] < 1024  # better than a uniform guess over the vocabulary
    assert len(json.loads((run_dir / "vocab.json").read_text())) == 1024


def test_a_table_model_on_text_is_refused(cli, tmp_path):
    result = cli(
        "data=text", "model=mlp", "data.max_tokens=20000", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert result.returncode == 2
    assert "use model=transformer" in result.stdout
