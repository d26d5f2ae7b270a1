"""One-pass streaming statistics for MSE, RMSE, MAE and R^2.

State (float64, shape ``[5]``): ``n``, ``mean`` of the target, ``m2`` = sum of squared
deviations of the target from its mean, ``sse`` = sum of squared errors, ``sae`` = sum of
absolute errors. Then ``mse = sse / n``, ``mae = sae / n``, ``r2 = 1 - sse / m2``.

Why mean/M2 instead of sum and sum of squares: ``tss = sum(y^2) - (sum y)^2 / n`` cancels
catastrophically when the target has a large mean (targets ~ 1e6 + N(0, 1) lose every digit
in fp32 and most in fp64 at 1e7 samples). Partial results are merged with Chan et al.'s
parallel update ``m2 = m2_a + m2_b + delta^2 * n_a * n_b / n``, always in float64.

Inputs: ``preds`` and ``target`` with the same number of elements (any shape, flattened; one
output), any float dtype. The Triton kernel reads each block of ``BLOCK`` elements once,
computes block-local ``count``, target mean and M2 *relative to the block's first target*
(the shift keeps fp32 exact for large-mean targets; fp64 inputs are computed in fp64) and
the block's squared/absolute error sums, and writes one row of partials per block. The host
side merges those rows into the state with vectorised float64 torch ops: no ``.item()``,
no sync. The PyTorch fallback does the same in float64 per batch (two-pass mean/M2).
"""

import torch

from kernels._common import LazyJit, pick_backend, tl, triton

STATE_SIZE = 5  # n, mean, m2, sse, sae
_BLOCK = 2048  # elements per block partial: long enough for bandwidth, short for fp32 sums


class RegressionStats:
    """Float64 state ``[n, mean, m2, sse, sae]`` (see module docstring)."""

    def __init__(self, device: torch.device | str | None = None):
        self.state = torch.zeros(STATE_SIZE, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.state.device

    def to(self, device) -> "RegressionStats":
        self.state = self.state.to(device)
        return self

    def reset(self) -> None:
        self.state.zero_()


def merge_moments(parts: torch.Tensor) -> torch.Tensor:
    """Merge ``[k, 5]`` partial states (float64) into one ``[5]`` state (Chan et al.).

    Rows with ``n == 0`` must have ``mean == 0`` (true for fresh states and never produced
    by the kernels), so they contribute nothing.
    """
    n, mean, m2, sse, sae = parts.unbind(1)
    total = n.sum()
    weight = n / total.clamp(min=1.0)
    merged_mean = (weight * mean).sum()
    merged_m2 = m2.sum() + (n * (mean - merged_mean).square()).sum()
    return torch.stack([total, merged_mean, merged_m2, sse.sum(), sae.sum()])


def regression_stats(
    preds: torch.Tensor, target: torch.Tensor, stats: RegressionStats, *, backend: str = "auto"
) -> None:
    """Accumulate one batch into ``stats`` in place (no host sync)."""
    preds, target = preds.detach().reshape(-1), target.detach().reshape(-1)
    if preds.numel() != target.numel():
        raise ValueError(f"{preds.numel()} predictions but {target.numel()} targets")
    if not (preds.is_floating_point() or target.is_floating_point()):
        preds = preds.double()  # integer-valued regression targets: compute exactly in fp64
    if target.numel() == 0:
        return
    if stats.device != preds.device or preds.device != target.device:
        raise ValueError(
            f"stats on {stats.device}, preds on {preds.device}, target on {target.device}"
        )
    if pick_backend(preds, backend) == "triton":
        batch = _triton_batch(preds, target)
    else:
        batch = _torch_batch(preds, target)
    stats.state.copy_(merge_moments(torch.stack([stats.state, batch])))


def _torch_batch(preds, target):
    """Batch state in float64 with a two-pass mean/M2 (exact enough for any realistic N).

    BLAS ``dot`` and a 1-norm do the sums in one op each: this runs once per update on CPU.
    """
    t = target.double()
    err = preds.double() - t
    mean = t.mean()
    dev = t - mean
    n = torch.full((), t.numel(), dtype=torch.float64, device=t.device)
    return torch.stack(
        [n, mean, torch.dot(dev, dev), torch.dot(err, err), torch.linalg.vector_norm(err, 1)]
    )


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------


def _triton_batch(preds, target):
    n = target.numel()
    preds, target = preds.contiguous(), target.contiguous()
    blocks = triton.cdiv(n, _BLOCK)
    partials = torch.empty((blocks, 6), dtype=torch.float64, device=preds.device)
    use_f64 = torch.float64 in (preds.dtype, target.dtype)
    _regression_partials_kernel[(blocks,)](
        preds,
        target,
        partials,
        n,
        DTYPE=tl.float64 if use_f64 else tl.float32,
        BLOCK=_BLOCK,
        num_warps=8,
    )
    count, shift, dmean, m2, sse, sae = partials.unbind(1)
    # shift + dmean only in float64: in fp32 it would round a 1e6-scale mean to 1/16.
    return merge_moments(torch.stack([count, shift + dmean, m2, sse, sae], dim=1))


def _regression_partials(p_ptr, t_ptr, out_ptr, N, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: count, shift (first target), mean(t - shift), M2, SSE, SAE."""
    pid = tl.program_id(0)
    offs = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = offs < N
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(DTYPE)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(DTYPE)
    shift = tl.load(t_ptr + pid.to(tl.int64) * BLOCK).to(DTYPE)  # block start < N always
    count = tl.sum(mask.to(DTYPE), axis=0)
    d = tl.where(mask, t - shift, 0.0)  # exact in fp32 when t is near shift (Sterbenz)
    d_mean = tl.sum(d, axis=0) / count
    dev = tl.where(mask, d - d_mean, 0.0)
    err = tl.where(mask, p - t, 0.0)
    row = out_ptr + pid.to(tl.int64) * 6
    tl.store(row + 0, count.to(tl.float64))
    tl.store(row + 1, shift.to(tl.float64))
    tl.store(row + 2, d_mean.to(tl.float64))
    tl.store(row + 3, tl.sum(dev * dev, axis=0).to(tl.float64))
    tl.store(row + 4, tl.sum(err * err, axis=0).to(tl.float64))
    tl.store(row + 5, tl.sum(tl.abs(err), axis=0).to(tl.float64))


_regression_partials_kernel = LazyJit(_regression_partials)
