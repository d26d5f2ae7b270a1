"""LR schedules and the NaN guard's gradient norm."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from engine.config import SchedConfig
from engine.optim import build_scheduler, lr_factor
from engine.step_guard import StepGuard


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


def guard_of(params):
    optimizer = torch.optim.AdamW(params, fused=True)
    return StepGuard(
        optimizer, torch.device("cpu"), mode="immediate", check_loss=True, check_grads=True
    )


def test_the_guard_reads_the_same_total_norm_as_torch_clipping():
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 3), (3,), (2, 2)]]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    guard = guard_of(params)
    verdict = guard.read(guard.measure(torch.tensor(1.5), params, None), 1, 0, 0)
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9)
    assert verdict.loss == 1.5 and verdict.norm == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_one_non_finite_gradient_makes_the_norm_non_finite(bad):
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    params[0].grad = torch.ones(3)
    params[1].grad = torch.tensor([0.0, bad, 1.0])
    guard = guard_of(params)
    verdict = guard.read(guard.measure(torch.tensor(0.1), params, None), 1, 0, 0)
    assert verdict.grads_bad and not math.isfinite(verdict.norm)


def test_a_warmup_fraction_is_capped_in_steps_but_an_explicit_warmup_is_not():
    from engine.optim import describe_warmup, warmup_capped, warmup_steps

    fraction = sched_cfg(name="cosine", warmup_fraction=0.05)  # warmup_max_steps: default 1000
    assert warmup_steps(fraction, 600) == 30  # the default digits run: untouched
    assert warmup_steps(fraction, 2_000_000) == 1000
    assert not warmup_capped(fraction, 600) and warmup_capped(fraction, 2_000_000)
    assert lr_factor(fraction, 999, 2_000_000, 20) == pytest.approx(1.0)
    assert lr_factor(fraction, 499, 2_000_000, 20) == pytest.approx(0.5)
    assert describe_warmup(fraction, 2_000_000) == (
        "warm-up: 1000 steps (5% of 2000000 planned steps, capped by sched.warmup_max_steps=1000)"
    )
    assert describe_warmup(fraction, 600) == "warm-up: 30 steps (5% of 600 planned steps)"
    uncapped = sched_cfg(name="cosine", warmup_fraction=0.05, warmup_max_steps=0)
    assert warmup_steps(uncapped, 2_000_000) == 100_000
    explicit = sched_cfg(name="cosine", warmup_steps=5000, warmup_max_steps=1000)
    assert warmup_steps(explicit, 2_000_000) == 5000 and not warmup_capped(explicit, 2_000_000)
    assert describe_warmup(explicit, 2_000_000) == "warm-up: 5000 steps (sched.warmup_steps)"


def test_a_capped_schedule_is_rebuilt_identically_from_its_config():
    cfg = sched_cfg(name="cosine", warmup_fraction=0.05, warmup_max_steps=7)
    opt = optimizer()
    schedule = build_scheduler(cfg, opt, total_steps=1000, steps_per_epoch=10)
    for _ in range(5):
        schedule.step()
    fresh_opt = optimizer()
    fresh = build_scheduler(cfg, fresh_opt, total_steps=1000, steps_per_epoch=10)
    fresh.load_state_dict(schedule.state_dict())
    assert fresh.warmup_steps == schedule.warmup_steps == 7
    for _ in range(5):
        schedule.step()
        fresh.step()
        assert fresh.get_last_lr() == schedule.get_last_lr()


def _stopping_trainer(patience: int, warmup: int):
    """The early-stopping bookkeeping of a Trainer, without a model behind it."""
    from types import SimpleNamespace

    from engine.trainer import FitState, Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = SimpleNamespace(early_stop_patience=patience)
    trainer.scheduler = SimpleNamespace(warmup_steps=warmup)
    trainer.state = FitState()
    trainer.monitor, trainer.monitor_mode = "val/acc", "max"
    trainer.val_loader = object()
    trainer.stop_reason = ""
    trainer.save_checkpoint = lambda best=False: None
    return trainer


def test_epochs_that_end_inside_the_warmup_do_not_use_up_the_patience():
    trainer = _stopping_trainer(patience=2, warmup=100)
    accs = [0.5, 0.4, 0.4, 0.4, 0.6, 0.3, 0.3]  # 20 steps an epoch: epochs 1-4 end in warm-up
    for epoch, acc in enumerate(accs):
        trainer.state.global_step = 20 * (epoch + 1)
        trainer._end_epoch(epoch, {"val/acc": acc})
        if trainer.stop_reason:
            break
    assert trainer.state.best_epoch == 4 and trainer.state.best_value == 0.6
    assert epoch == 6 and "not improved for 2 epochs" in trainer.stop_reason
    # The best epoch is still tracked inside the warm-up.
    early = _stopping_trainer(patience=2, warmup=100)
    for epoch, acc in enumerate([0.5, 0.7, 0.6]):
        early.state.global_step = 20 * (epoch + 1)
        early._end_epoch(epoch, {"val/acc": acc})
    assert early.state.best_epoch == 1 and early.state.bad_epochs == 0 and not early.stop_reason
