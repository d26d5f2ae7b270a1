"""LR schedules and the NaN guard's gradient norm."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from engine.config import SchedConfig
from engine.optim import build_scheduler, lr_factor
from engine.trainer import _loss_and_grad_norm


def optimizer(lrs=(0.1, 0.05)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups)


def sched_cfg(**values):
    return OmegaConf.structured(SchedConfig(**values))


CASES = {
    "cosine_warmup": dict(name="cosine", warmup_steps=3, min_lr_ratio=0.1),
    "step": dict(name="step", step_size=2, gamma=0.5),
    "none_warmup_fraction": dict(name="none", warmup_fraction=0.2),
    "none": dict(name="none"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_lr_after_each_step_is_the_peak_times_the_schedule_factor(case):
    cfg = sched_cfg(**CASES[case])
    opt = optimizer()
    schedule = build_scheduler(cfg, opt, total_steps=20, steps_per_epoch=4)
    for step in range(20):
        factor = lr_factor(cfg, step, 20, 4)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, 0.05 * factor])
        opt.step()
        schedule.step()


def test_a_cosine_schedule_warms_up_then_decays_to_its_floor():
    cfg = sched_cfg(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    factors = [lr_factor(cfg, s, 24, 6) for s in range(24)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert lr_factor(cfg, 24, 24, 6) == pytest.approx(0.1)


def test_a_restored_schedule_continues_where_it_stopped():
    cfg = sched_cfg(name="cosine", warmup_steps=2)
    opt = optimizer()
    schedule = build_scheduler(cfg, opt, total_steps=10, steps_per_epoch=5)
    for _ in range(6):
        schedule.step()
    state = schedule.state_dict()
    expected = [g["lr"] for g in opt.param_groups]
    fresh_opt = optimizer()
    fresh = build_scheduler(cfg, fresh_opt, total_steps=10, steps_per_epoch=5)
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh_opt.param_groups] == expected
    schedule.step()
    fresh.step()
    assert fresh.get_last_lr() == schedule.get_last_lr()


def test_the_guard_reads_the_same_total_norm_as_torch_clipping():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 3), (3,), (2, 2)]]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    loss, norm = _loss_and_grad_norm(torch.tensor(1.5), params)
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9)
    assert loss == 1.5 and norm == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_one_non_finite_gradient_makes_the_norm_non_finite(bad):
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad = torch.ones(3)
    params[1].grad = torch.tensor([0.0, bad, 1.0])
    _, norm = _loss_and_grad_norm(torch.tensor(0.1), params)
    assert not math.isfinite(norm)
