"""The NaN guard without a host sync per step (engine/step_guard.py), run in this process.

The deferred guard (the default on CUDA) lets the fused optimizer skip a non-finite update on the
device and reads the verdict one step later; the immediate one (the CPU's default) reads it before
each step. On the CPU both run for real here (``trainer.nan_check=deferred`` forces the deferred
one), and the tests hold the deferred guard to the immediate one: the same weights to the bit,
the same logged losses, the same skips and stops. The GPU test counts CUDA synchronisations with
torch's own sync debug mode.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir

from engine.faults import Faults
from engine.step_guard import StepGuard
from engine.train import build_job
from engine.trainer import NonFiniteError

# digits with batch 128: 10 optimizer steps per epoch; a warm-up and a cosine schedule, so a
# step counted wrongly changes every later lr and shows in the weights.
BASE = [
    "model.hidden=32",
    "data.batch_size=128",
    "trainer.max_epochs=2",
    "trainer.seed=7",
    "trainer.device=cpu",
    "trainer.resume=never",
    "trainer.log_every_n_steps=1",
    "trainer.progress=none",
    "sched.warmup_steps=4",
]
STEPS_PER_EPOCH = 10


def build(tmp_path, name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*BASE, *overrides])
    return build_job(cfg, tmp_path / name, hparams_session=False)


def fit(tmp_path, name: str, *overrides: str, nan_at: int = 0):
    """Train; return the trainer, the (step, loss) pairs logged, and the NonFiniteError's text."""
    job = build(tmp_path, name, *overrides)
    trainer = job.trainer
    if nan_at:
        trainer.faults = Faults(nan_at_step=nan_at)
    logged: list[tuple[int, float]] = []
    scalars = trainer.logger.scalars

    def record(values, step):
        if "train/loss" in values:
            logged.append((step, values["train/loss"]))
        scalars(values, step)

    trainer.logger.scalars = record
    error = ""
    try:
        trainer.fit()
    except NonFiniteError as e:
        error = str(e)
    finally:
        job.logger.close()
    return trainer, logged, error


def assert_same_state(a, b, *, unsaved=()):
    """Weights, optimizer moments and step counts, schedule and fit counters, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), name
    for index, entries in sa["optimizer"]["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, sb["optimizer"]["state"][index][key]), (index, key)
    assert sa["scheduler"] == sb["scheduler"]
    assert [g["lr"] for g in a.optimizer.param_groups] == [
        g["lr"] for g in b.optimizer.param_groups
    ]
    timing = "throughput/samples_per_s"  # wall-clock, the one value that may differ
    fa, fb = (
        {k: ({m: v for m, v in x.items() if m != timing} if isinstance(x, dict) else x)
         for k, x in fit.items()}
        for fit in (sa["fit"], sb["fit"])
    )  # fmt: skip
    for key in unsaved:
        fa.pop(key), fb.pop(key)
    assert fa == fb


RECIPES = {
    "adamw, clipped": ["optim=adamw", "trainer.grad_clip=1.0"],
    "adamw, unclipped": ["optim=adamw", "trainer.grad_clip=0"],
    "adam": ["optim=adam"],
    "sgd with momentum": ["optim=sgd", "optim.momentum=0.9"],
    "accumulating": ["trainer.accumulate_grad_batches=3"],
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_finite_run_is_bit_identical_under_both_guards(tmp_path, recipe):
    immediate, logged_i, _ = fit(tmp_path, "i", *RECIPES[recipe], "trainer.nan_check=immediate")
    deferred, logged_d, _ = fit(tmp_path, "d", *RECIPES[recipe], "trainer.nan_check=deferred")
    assert deferred.guard.deferring and not immediate.guard.deferring
    assert_same_state(immediate, deferred)
    assert logged_d == logged_i and len(logged_i) == deferred.state.global_step


@pytest.mark.parametrize("nan_at", [1, 5, STEPS_PER_EPOCH])  # the first, a middle, an epoch's last
def test_a_nan_stops_both_guards_at_the_same_step_with_the_same_weights(tmp_path, nan_at):
    immediate, _, error_i = fit(tmp_path, "i", "trainer.nan_check=immediate", nan_at=nan_at)
    deferred, _, error_d = fit(tmp_path, "d", "trainer.nan_check=deferred", nan_at=nan_at)
    epoch_batch = f"epoch 1, batch {nan_at}"
    assert f"non-finite loss (nan) at step {nan_at} ({epoch_batch})" in error_d
    assert error_d == error_i
    assert deferred.state.global_step == nan_at - 1
    assert all(torch.isfinite(p).all() for p in deferred.raw_model.parameters())
    # The deferred guard stops one batch later: its batch counter, which no checkpoint saves
    # after a stop, is one ahead.
    assert_same_state(immediate, deferred, unsaved=["batch_in_epoch"])


@pytest.mark.parametrize("recipe", ["adamw, clipped", "sgd with momentum"])
@pytest.mark.parametrize("nan_at", [1, 5])
def test_a_skipped_step_is_skipped_alike_and_does_not_advance_the_schedule(
    tmp_path, recipe, nan_at
):
    skip = [*RECIPES[recipe], "trainer.on_nan=skip"]
    immediate, logged_i, _ = fit(tmp_path, "i", *skip, "trainer.nan_check=immediate", nan_at=nan_at)
    deferred, logged_d, _ = fit(tmp_path, "d", *skip, "trainer.nan_check=deferred", nan_at=nan_at)
    assert deferred.state.nan_skips == 1
    assert deferred.state.global_step == 2 * STEPS_PER_EPOCH - 1
    assert deferred.scheduler.step_count == deferred.state.global_step
    assert_same_state(immediate, deferred)
    assert logged_d == logged_i  # the skipped step logs no loss; the others keep their numbers
    assert all(math.isfinite(loss) for _, loss in logged_d)


def test_the_skip_budget_ends_the_run_at_the_step_that_exceeds_it(tmp_path):
    deferred, _, error = fit(
        tmp_path, "d", "trainer.on_nan=skip", "trainer.max_nan_skips=0", "trainer.nan_check=deferred",
        nan_at=3,
    )  # fmt: skip
    assert "non-finite loss (nan) at step 3 (epoch 1, batch 3)" in error
    assert deferred.state.global_step == 2


class HostReads:
    """Every tensor read to the host (``tolist``, ``item``, ``float()``, ...), with the step it
    happened in: on a GPU each of these on a device tensor waits for the device."""

    METHODS = ("tolist", "item", "__float__", "__int__", "__bool__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.reads: list[tuple[int, torch.Tensor]] = []
        self.step = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            self.reads.append((self.step, tensor))
            return original(tensor, *args, **kwargs)

        return read


def one_epoch_of_reads(tmp_path, monkeypatch, mode: str):
    """Train one epoch with no log step in it; return the trainer, and the step numbers of the
    reads of its staged copy and of every other tensor."""
    job = build(tmp_path, mode, f"trainer.nan_check={mode}", "trainer.log_every_n_steps=1000")
    trainer = job.trainer
    reads = HostReads(monkeypatch)
    step = trainer.optimizer_step

    def counted_step(*args):
        reads.step += 1
        step(*args)

    trainer.optimizer_step = counted_step
    trainer.train_epoch(0)
    job.logger.close()
    staging = trainer.guard.staging.untyped_storage().data_ptr()
    staged = [s for s, t in reads.reads if t.untyped_storage().data_ptr() == staging]
    other = [s for s, t in reads.reads if t.untyped_storage().data_ptr() != staging]
    return trainer, staged, other


def test_between_log_steps_the_deferred_guard_reads_only_its_staged_copy(tmp_path, monkeypatch):
    trainer, staged, other = one_epoch_of_reads(tmp_path, monkeypatch, "deferred")
    # Step k reads step k-1's copy (made by a non-blocking copy a step earlier); the epoch's
    # end reads the last one and the epoch's loss sum. Nothing else is read.
    assert staged == list(range(2, STEPS_PER_EPOCH + 1)) + [STEPS_PER_EPOCH]
    assert other == [STEPS_PER_EPOCH]
    assert trainer.state.global_step == STEPS_PER_EPOCH


def test_the_immediate_guard_reads_each_step_before_it_is_taken(tmp_path, monkeypatch):
    _, staged, other = one_epoch_of_reads(tmp_path, monkeypatch, "immediate")
    assert staged == []
    assert other == [*range(1, STEPS_PER_EPOCH + 1), STEPS_PER_EPOCH]


def test_an_optimizer_without_the_flag_keeps_the_immediate_guard():
    weight = torch.nn.Parameter(torch.ones(3))
    foreach = torch.optim.AdamW([weight], foreach=True)
    guard = StepGuard(
        foreach, torch.device("cpu"), mode="deferred", check_loss=True, check_grads=True
    )
    assert not guard.deferring
    fused = torch.optim.AdamW([weight], fused=True)
    guard = StepGuard(
        fused, torch.device("cpu"), mode="deferred", check_loss=True, check_grads=True
    )
    assert guard.deferring


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_one_non_finite_gradient_keeps_the_deferred_update_out_and_is_named(bad):
    weights = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.AdamW(weights, lr=0.1, fused=True)
    guard = StepGuard(
        optimizer, torch.device("cpu"), mode="deferred", check_loss=True, check_grads=True
    )
    before = [w.detach().clone() for w in weights]
    weights[0].grad = torch.ones(3)
    weights[1].grad = torch.tensor([0.5, bad])
    values = guard.measure(torch.tensor(0.25), weights, None)
    guard.step(values)
    assert all(torch.equal(w.detach(), b) for w, b in zip(weights, before))
    assert all(int(optimizer.state[w]["step"]) == 0 for w in weights)  # the step count too
    guard.stage(values, 7, 1, 3)
    verdict = guard.take()
    assert verdict.grads_bad and not verdict.loss_bad and verdict.loss == 0.25
    assert verdict.where == "step 7 (epoch 2, batch 4)"


def test_under_a_grad_scaler_a_non_finite_loss_alone_still_keeps_the_update_out():
    """fp16's path (CUDA in a real run; the same GradScaler machinery runs on the CPU here): the
    gradients are finite, so only the guard's loss check can stop the step."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard = StepGuard(
        optimizer, torch.device("cpu"), mode="deferred", check_loss=True, check_grads=False,
        scaler=scaler,
    )  # fmt: skip
    before = weight.detach().clone()
    loss = (weight * 2).sum()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    values = guard.measure(loss * float("nan"), [weight], None)
    guard.step(values)
    assert torch.equal(weight.detach(), before)
    assert scaler.get_scale() == 2.0  # the scaler counted the step as overflowed and backed off
    guard.stage(values, 1, 0, 0)
    verdict = guard.take()
    assert (
        verdict.loss_bad and not verdict.grads_bad and verdict.where == "step 1 (epoch 1, batch 1)"
    )
    optimizer.zero_grad()
    loss = (weight * 2).sum()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    guard.step(guard.measure(loss, [weight], None))
    assert not torch.equal(weight.detach(), before)  # a finite step goes through


@pytest.mark.gpu
def test_on_a_gpu_no_step_between_log_steps_synchronises(tmp_path):
    job = build(
        tmp_path, "g", "trainer.device=cuda", "trainer.log_every_n_steps=1000", "trainer.max_epochs=1"
    )  # fmt: skip
    trainer = job.trainer
    assert trainer.guard.deferring
    step = trainer.optimizer_step
    count = [0]

    def watched_step(*args):
        count[0] += 1
        # From the second step on (the first follows the epoch's one-off index upload).
        torch.cuda.set_sync_debug_mode("warn" if count[0] > 1 else "default")
        step(*args)

    trainer.optimizer_step = watched_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for x, y in trainer.train_loader.iter_from(0):  # what train_epoch does per batch
                x, y = x.to(trainer.device), y.to(trainer.device)
                with trainer._autocast():
                    loss = trainer.objective(trainer.model, x, y)
                loss.backward()
                trainer.optimizer_step(loss, 0, count[0])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert syncs == [], syncs[:3]
    trainer.settle()
    job.logger.close()
    assert trainer.state.global_step == STEPS_PER_EPOCH
