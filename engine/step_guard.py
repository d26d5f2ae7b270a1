"""The NaN guard of an optimizer step: the verdict decided on the device, read by the host later.

A non-finite loss or gradient must never reach the weights. The plain way to keep it out reads
the loss and the gradient norm to the host before ``optimizer.step``: on a GPU that read waits for
the step's kernels to finish, so the host cannot queue the next batch while they run, and a small
model's GPU then idles for part of every step.

The deferred guard decides on the device instead. It computes ``found_inf`` (1.0 when the checked
values are not finite) and hands it to the fused optimizer, whose kernel skips the update and the
step count when the flag is set; this is the attribute ``torch.amp.GradScaler`` sets on the same
optimizers. The loss and the norm go to the host through a non-blocking copy into pinned memory,
and the host reads them one step later, after it has queued the next step's forward and backward
but before that step's update: a stop or a skip is acted on before anything else can reach the
weights, and the message names the step that failed. That read waits on a CUDA event for the
previous step's kernels only, while the GPU already holds the next step's work: the host stays a
step ahead instead of draining the queue. (torch's sync debug mode, which flags the reads that
drain it, such as ``.item()`` or a blocking copy, does not flag event waits.)

The immediate guard is the plain way. It is kept for optimizers that cannot take the flag (any but
the fused Adam, AdamW and SGD), for SGD's first momentum step (``torch._fused_sgd_`` would leave
an uninitialised momentum buffer behind a skipped first step), and by default on the CPU, where
every op has finished when it returns, so reading its result costs nothing and the deferred
guard's extra ops would be pure cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Verdict:
    """The host's reading of one optimizer step."""

    step: int  # the optimizer step's number (1-based) when it was taken
    epoch: int  # 0-based, as the trainer counts
    batch: int  # 0-based index of the batch that completed the step
    loss: float
    norm: float
    loss_bad: bool
    grads_bad: bool

    @property
    def bad(self) -> bool:
        return self.loss_bad or self.grads_bad

    @property
    def where(self) -> str:
        return f"step {self.step} (epoch {self.epoch + 1}, batch {self.batch + 1})"


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` flag: the fused implementations do (the
    foreach and for-loop ones assert that none is set)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


class StepGuard:
    """Checks each optimizer step's loss and gradient norm; see the module's docstring.

    ``check_loss``: whether a non-finite loss fails the step (off under DDP, where each rank has
    its own loss and the ranks would disagree). ``check_grads``: whether a non-finite gradient
    norm does (off under fp16, whose grad scaler skips such steps as routine).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        mode: str,
        check_loss: bool,
        check_grads: bool,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.optimizer = optimizer
        self.check_loss, self.check_grads = check_loss, check_grads
        self.scaler = scaler
        wanted = mode == "deferred" or (mode == "auto" and device.type == "cuda")
        self.deferring = wanted and takes_found_inf(optimizer) and _scaler_state_known(scaler)
        # SGD with momentum defers only once its momentum buffers exist (see the module's note).
        self._first_momentum_step = self.deferring and _sgd_momentum(optimizer)
        # Which of [loss, norm or per-tensor norms...] decide found_inf on the device.
        self._checked = slice(0 if check_loss else 1, None if check_grads else 1)
        self._pinned = device.type == "cuda"
        # Two slots of (pinned) host memory, sized at the first step, each with the event that
        # says its copy has landed.
        self.staging = torch.empty((2, 0), dtype=torch.float32)
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if self._pinned else [None, None]
        self._slot = 0
        self._staged: tuple[torch.Tensor, torch.cuda.Event | None, int, int, int] | None = None

    def defers_now(self) -> bool:
        """Whether this step's verdict is left to the device (else it is read before the step)."""
        if self._first_momentum_step:
            if not _momentum_buffers_exist(self.optimizer):
                return False
            self._first_momentum_step = False
        return self.deferring

    def measure(
        self, loss: torch.Tensor, params: list[torch.Tensor], norm: torch.Tensor | None
    ) -> torch.Tensor:
        """The step's values as one float32 tensor on the device, with no host read: [loss,
        total gradient norm] when clipping computed it, else [loss, per-tensor norms...]. The host
        combines those into the total when it reads them; the device needs only their finiteness
        (a total norm would cost two more ops a step, which a small model's step feels)."""
        loss = loss.detach().float().reshape(())
        if norm is not None:
            return torch.stack([loss, norm.float().reshape(())])
        grads = [p.grad for p in params if p.grad is not None]
        return torch.stack([loss, *torch._foreach_norm(grads, 2, dtype=torch.float32)])

    def step(self, values: torch.Tensor | None) -> None:
        """``optimizer.step`` (through the scaler under fp16). With ``values`` (a deferred step)
        the device decides: a non-finite checked value makes the fused kernel leave every weight,
        moment and step count as it was. None: the host has read the step and found it finite."""
        opt = self.optimizer
        found_inf = None
        checked = values[self._checked] if values is not None else None
        if checked is not None and checked.numel():
            found_inf = torch.where(checked.isfinite().all(), 0.0, 1.0)
        if self.scaler is not None:
            if found_inf is not None:  # the loss check joins the scaler's own inf check
                for flag in _scaler_found_inf(self.scaler, opt):
                    torch.maximum(flag, found_inf.to(flag.device), out=flag)
            self.scaler.step(opt)
            self.scaler.update()
            return
        if found_inf is None:
            opt.step()
            return
        opt.found_inf = found_inf
        try:
            opt.step()
        finally:
            del opt.found_inf

    def stage(self, values: torch.Tensor, step: int, epoch: int, batch: int) -> None:
        """Start copying ``values`` to the host; :meth:`take` reads them later."""
        n = values.numel()
        if n > self.staging.shape[1]:  # the first step (or more gradients than so far)
            self.staging = torch.empty((2, n), dtype=torch.float32, pin_memory=self._pinned)
        host, event = self.staging[self._slot, :n], self._events[self._slot]
        self._slot ^= 1  # two slots: the copy being made never overwrites the one not yet read
        host.copy_(values, non_blocking=True)
        if event is not None:
            event.record()
        self._staged = (host, event, step, epoch, batch)

    def take(self) -> Verdict | None:
        """The staged step's verdict (waiting for that step's kernels only), or None."""
        if self._staged is None:
            return None
        host, event, step, epoch, batch = self._staged
        self._staged = None
        if event is not None:
            event.synchronize()
        return self._verdict(host.tolist(), step, epoch, batch)

    def read(self, values: torch.Tensor, step: int, epoch: int, batch: int) -> Verdict:
        """The verdict of ``values`` now: the immediate guard's one host read per step."""
        return self._verdict(values.tolist(), step, epoch, batch)

    def _verdict(self, read: list[float], step: int, epoch: int, batch: int) -> Verdict:
        loss, *norms = read
        norm = norms[0] if len(norms) == 1 else math.hypot(*norms)  # one C call per step
        return Verdict(
            step=step,
            epoch=epoch,
            batch=batch,
            loss=loss,
            norm=norm,
            loss_bad=self.check_loss and not math.isfinite(loss),
            grads_bad=self.check_grads and not math.isfinite(norm),
        )


def _sgd_momentum(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.SGD) and any(
        group.get("momentum", 0) for group in optimizer.param_groups
    )


def _momentum_buffers_exist(optimizer: torch.optim.Optimizer) -> bool:
    return all(
        optimizer.state.get(p, {}).get("momentum_buffer") is not None
        for group in optimizer.param_groups
        for p in group["params"]
        if p.grad is not None
    )


def _scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer):
    """The scaler's per-device inf flags of ``optimizer`` after ``unscale_``: the tensors its
    ``step`` hands the fused optimizer as ``found_inf`` and its ``update`` backs the scale off on.
    A private field of GradScaler (``_scaler_state_known`` checks it exists before we rely on it)."""
    return list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())


def _scaler_state_known(scaler: torch.amp.GradScaler | None) -> bool:
    """Whether ``scaler`` keeps the per-optimizer state the deferred fp16 path joins its loss
    check to; a torch without it gets the immediate guard."""
    return scaler is None or isinstance(getattr(scaler, "_per_optimizer_states", None), dict)
