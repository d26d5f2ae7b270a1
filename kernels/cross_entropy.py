"""Cross entropy over the LAST dimension: an online-softmax Triton kernel and a PyTorch fallback.

Shapes
    logits  [..., C]  floating (fp32, bf16, fp16). The class dim is the LAST one, unlike
                      ``torch.nn.functional.cross_entropy``, which wants ``[N, C, d1, ...]``.
                      For ``[B, T, V]`` language-model logits pass them as they are.
    target  [...]     integer class ids, ``target.shape == logits.shape[:-1]``.
    weight  [C]       optional per-class weight.
    result            ``[...]`` for ``reduction="none"``, a scalar otherwise; dtype of logits.

Formula, per counted row n (``target[n] != ignore_index``), lse = logsumexp(logits[n]),
eps = label_smoothing, w = weight (all ones without it)::

    loss[n] = (1 - eps) * w[y] * (lse - x[y]) + eps / C * sum_c w[c] * (lse - x[c])
              + z_loss * lse**2

This is torch's formula (the smoothing term is weighted too); the z-loss term is not multiplied
by the class weight. Ignored rows give 0. ``"mean"`` divides the sum by the sum of ``w[y]`` over
counted rows (their count without weight), like torch; when that is 0 (all rows ignored) the
divisor is replaced by 1 on the device, so the loss and the gradients are 0 where torch gives
NaN. ``"sum"`` and ``"none"`` need no divisor.

How the Triton path works (one program per row, the row streamed in BLOCK-wide pieces)
    pass 1  running max and running sum of exp (online softmax) -> lse, loss; x[y], and with
            label smoothing sum_c w[c] * x[c], come from the same pass.
    pass 2  only when the logits need a gradient: re-read the row and write
            d loss / d logits, already divided by the mean normaliser.
    So forward + backward read the logits twice and write the gradient once. Everything is
    computed in fp32 and cast once, at the store (bf16 ``p - 1`` near softmax = 1 would
    otherwise lose all its digits). Row offsets are int64 (``row * stride`` overflows int32
    once N*C >= 2**31). The row stride is a kernel argument: only the last dim must be
    contiguous; a view such as ``big[:, :C]`` or ``big[::2]`` is used without a copy.
    ``backward`` multiplies the stored gradient by ``grad_output`` (per row for ``"none"``);
    its kernel reads ``grad_output`` on the device and leaves rows whose factor is exactly 1
    untouched, so the usual ``loss.backward()`` adds no memory traffic.

No host sync: no ``.item()`` and no Python branch on tensor values; the mean normaliser is a
device tensor. Out-of-range targets (neither ``ignore_index`` nor in ``[0, C)``) are therefore
not checked: the Triton kernel masks their load (a meaningless loss, no out-of-bounds read),
the torch fallback raises from indexing.

Memory. The gradient is computed in the forward and kept until backward. By default it goes to
a new buffer the size of the logits. ``inplace_grad=True`` writes it into the logits buffer
instead, which saves that buffer. Rule: only when nothing reads the logits after this call,
typically logits fresh out of a matmul. The autograd version counter of the logits is bumped,
so another autograd node that saved them (e.g. ``tanh`` soft-capping) makes backward raise
torch's "modified by an inplace operation" error instead of silently using gradients as
logits. When the logits had to be copied (non-contiguous last dim), the copy is overwritten
and the caller's tensor is untouched. Backward may run once per forward (the stored gradient
is scaled in place); a second call raises.

The PyTorch fallback computes the same closed-form gradient with plain torch ops in fp32,
in row chunks of bounded size, so the same autograd Function serves both backends. (It zeroes
ignored rows by a factor of 0, so their gradient is 0 as long as their logits are finite; the
Triton kernel writes zeros without reading them.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._common import LazyJit, next_power_of_2, pick_backend, tl

__all__ = ["cross_entropy"]

REDUCTIONS = ("none", "mean", "sum")
# Byte budget of the fp32 temporaries of one row chunk in the torch fallback. On CPU modest
# chunks keep their buffers recycled by the allocator (and warm in cache) instead of faulting
# in fresh pages: fwd+bwd at 2048 x 32000 fp32 runs ~1.7x faster than eager F.cross_entropy,
# vs ~0.9x with 256 MiB chunks; much smaller chunks multiply the parallel regions, which hurts
# when the cores are oversubscribed. On GPU each chunk costs ~15 kernel launches: larger there.
TORCH_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
TORCH_CHUNK_MIN_ROWS = 8


@dataclass(frozen=True)
class CEOptions:
    """The scalar options of one cross entropy call, shared with the linear variant."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0


# ``ignore_index=None`` ("no row is ignored") is carried as a target value no int64 id can take
# in practice, so the kernels keep a single code path; callers that know every row counts (a
# classifier's labels) use it to skip the all-ignored guard.
NO_IGNORE = -(2**63)


def make_options(ignore_index: int | None, label_smoothing: float, z_loss: float) -> CEOptions:
    index = NO_IGNORE if ignore_index is None else int(ignore_index)
    return CEOptions(index, float(label_smoothing), float(z_loss))


# --------------------------------------------------------------------------- Triton kernels


def _ce_rows_kernel(
    x_ptr,
    x_row_stride,
    g_ptr,
    g_row_stride,
    t_ptr,
    w_ptr,
    loss_ptr,
    scale_ptr,
    scale_stride,
    n_cols,
    ignore_index,
    eps,
    z_loss,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row: loss[row] and, if WRITE_GRAD, g[row, :] = scale[row] * d loss[row] / d x[row, :].

    g may alias x (in-place gradient): every element is loaded before it is stored.
    One function: a Triton kernel is one launch, and its two passes share the row's lse and
    gradient coefficients, so the steps are marked by comments rather than split into helpers.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    cols0 = tl.arange(0, BLOCK)
    y = tl.load(t_ptr + row).to(tl.int64)
    if y == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            g_row = g_ptr + row * g_row_stride
            zeros = tl.zeros([BLOCK], dtype=tl.float32).to(g_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                tl.store(g_row + cols, zeros, mask=cols < n_cols)
    else:
        in_range = (y >= 0) & (y < n_cols)
        x_y = tl.load(x_row + y, mask=in_range, other=0.0).to(tl.float32)
        # Pass 1: online softmax. The running max starts finite (near -FLT_MAX), so a block of
        # -inf logits gives exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
        m = -3.0e38
        s = 0.0
        sx = 0.0  # sum_c w[c] * x[c], label smoothing only
        ws = 0.0  # sum_c w[c], label smoothing with weight only
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
                    sx += tl.sum(w * tl.where(mask, x, 0.0), axis=0)
                    ws += tl.sum(w, axis=0)
                else:
                    sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
        lse = m + tl.log(s)

        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y, mask=in_range, other=0.0)
        else:
            w_y = 1.0
        loss = w_y * (lse - x_y)
        # d loss / d x[j] = p[j] * coef - hit * [j == y] - eps / C * w[j]
        coef = w_y
        hit = w_y
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w_sum = ws
            else:
                w_sum = n_cols * 1.0
            loss = (1.0 - eps) * loss + eps / n_cols * (w_sum * lse - sx)
            coef = (1.0 - eps) * w_y + eps / n_cols * w_sum
            hit = (1.0 - eps) * w_y
        if HAS_Z:
            loss += z_loss * lse * lse
            coef += 2.0 * z_loss * lse
        tl.store(loss_ptr + row, loss)

        if WRITE_GRAD:
            # Pass 2: the gradient, in fp32, cast once at the store.
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            g_row = g_ptr + row * g_row_stride
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                mask = cols < n_cols
                x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - lse) * coef
                if HAS_SMOOTHING:
                    if HAS_WEIGHT:
                        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
                        g -= eps / n_cols * w
                    else:
                        g -= eps / n_cols
                g = tl.where(cols == y, g - hit, g)
                tl.store(g_row + cols, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


def _scale_rows_kernel(g_ptr, g_row_stride, f_ptr, f_stride, n_cols, BLOCK: tl.constexpr):
    """g[row, :] *= f[row * f_stride]; rows whose factor is exactly 1 are not touched."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(f_ptr + row * f_stride).to(tl.float32)
    if f != 1.0:
        g_row = g_ptr + row * g_row_stride
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + cols, (g * f).to(g_ptr.dtype.element_ty), mask=mask)


_ce_rows = LazyJit(_ce_rows_kernel)
_scale_rows = LazyJit(_scale_rows_kernel)


# Widest column block of one row program, meant for H100/H200-class GPUs: wide blocks keep many
# loads in flight per row; untuned on hardware so far. Read at each launch, so a benchmark or a
# test can set it (the tests use 64 to get several blocks per row).
MAX_BLOCK = 8192


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row of n_cols: MAX_BLOCK or the row rounded up, if narrower."""
    block = min(next_power_of_2(MAX_BLOCK), next_power_of_2(n_cols))
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 8192 else 32
    return block, warps


# --------------------------------------------------------------------------- row backends
# Contract shared by both backends (and by kernels.linear_cross_entropy):
#   x [N, C] with x.stride(1) == 1, t [N] integer, w [C] fp32 or None,
#   scale: fp32 0-d (same for every row) or [N] (per row), applied to the gradient only,
#   loss_out [N] fp32 is written, grad_out [N, C] (may be x itself) is written when not None.


def rows_triton(x, t, w, opts: CEOptions, scale, loss_out, grad_out=None) -> None:
    n, c = x.shape
    if n == 0:
        return
    block, warps = launch_config(c)
    write_grad = grad_out is not None
    g = grad_out if write_grad else x  # never written when WRITE_GRAD is False
    _ce_rows[(n,)](
        x,
        x.stride(0),
        g,
        g.stride(0),
        t,
        w if w is not None else loss_out,  # dummy pointer when HAS_WEIGHT is False
        loss_out,
        scale,
        scale.stride(0) if scale.dim() else 0,
        c,
        opts.ignore_index,
        float(opts.label_smoothing),
        float(opts.z_loss),
        HAS_WEIGHT=w is not None,
        HAS_SMOOTHING=opts.label_smoothing > 0,
        HAS_Z=opts.z_loss != 0,
        WRITE_GRAD=write_grad,
        BLOCK=block,
        num_warps=warps,
    )


def _torch_rows_chunk(x, t, w, opts: CEOptions, scale, need_grad: bool):
    """Loss [n] fp32 and, if need_grad, the scaled gradient [n, C] fp32 for a few rows."""
    c = x.shape[1]
    eps, z = opts.label_smoothing, opts.z_loss
    x = x.float()
    valid = t != opts.ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t)).long()
    lse = torch.logsumexp(x, dim=1)
    x_y = x.gather(1, t_safe[:, None]).squeeze(1)
    w_y = w[t_safe] if w is not None else torch.ones_like(lse)
    loss = w_y * (lse - x_y)
    coef, hit = w_y, w_y
    if eps > 0:
        w_sum = w.sum() if w is not None else float(c)
        sx = x @ w if w is not None else x.sum(dim=1)
        loss = (1 - eps) * loss + eps / c * (w_sum * lse - sx)
        coef = (1 - eps) * w_y + eps / c * w_sum
        hit = (1 - eps) * w_y
    if z != 0:
        loss = loss + z * lse * lse
        coef = coef + 2 * z * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not need_grad:
        return loss, None
    # One factor per row: the reduction scale, and 0 for ignored rows (finite logits give
    # p * 0 = 0, so no separate masking pass over [n, C]).
    row = (scale * valid).float()
    g = torch.softmax(x, dim=1).mul_((coef * row)[:, None])
    if eps > 0 and w is not None:
        g.addr_(row, w, alpha=-eps / c)  # g -= eps/C * row (outer) w, one pass
    elif eps > 0:
        g.sub_((eps / c * row)[:, None])
    g.scatter_add_(1, t_safe[:, None], (-hit * row)[:, None])
    return loss, g


def rows_torch(x, t, w, opts: CEOptions, scale, loss_out, grad_out=None) -> None:
    """PyTorch twin of :func:`rows_triton`; fp32 temporaries bounded by TORCH_CHUNK_BYTES."""
    n, c = x.shape
    budget = TORCH_CHUNK_BYTES["cuda" if x.is_cuda else "cpu"]
    step = max(TORCH_CHUNK_MIN_ROWS, budget // (4 * 3 * max(c, 1)))  # ~3 fp32 [rows, C] buffers
    for s in range(0, n, step):
        e = min(n, s + step)
        row_scale = scale[s:e] if scale.dim() else scale
        loss, g = _torch_rows_chunk(x[s:e], t[s:e], w, opts, row_scale, grad_out is not None)
        loss_out[s:e] = loss
        if grad_out is not None:
            grad_out[s:e] = g


ROW_BACKENDS = {"triton": rows_triton, "torch": rows_torch}


def scale_rows(grad: torch.Tensor, factor: torch.Tensor, backend: str) -> None:
    """grad [N, C] *= factor (0-d, or [N] per row), in place, without a host sync."""
    if backend == "torch":
        grad.mul_(factor.float().reshape(-1, 1) if factor.dim() else factor.float())
        return
    n, c = grad.shape
    if n == 0:
        return
    f = factor.reshape(-1) if factor.dim() else factor
    block, warps = launch_config(c)
    _scale_rows[(n,)](
        grad, grad.stride(0), f, f.stride(0) if f.dim() else 0, c, BLOCK=block, num_warps=warps
    )


# --------------------------------------------------------------------------- shared host helpers


def check_args(logits_shape, device, target, weight, opts: CEOptions, reduction: str) -> None:
    """Shape/dtype/option checks; metadata only, so no host sync."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(logits_shape) < 1 or logits_shape[-1] < 1:
        raise ValueError(
            f"logits must have a non-empty last (class) dim, got {tuple(logits_shape)}"
        )
    if tuple(target.shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal logits.shape[:-1] = "
            f"{tuple(logits_shape[:-1])} (the class dim is the last one)"
        )
    if target.device != device:
        raise ValueError(f"target is on {target.device}, logits on {device}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class ids, got {target.dtype}")
    if weight is not None and tuple(weight.shape) != (logits_shape[-1],):
        raise ValueError(f"weight must have shape ({logits_shape[-1]},), got {tuple(weight.shape)}")
    if not 0.0 <= opts.label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {opts.label_smoothing}")


def class_weight_fp32(weight):
    return None if weight is None else weight.detach().float().contiguous()


def mean_divisor(t: torch.Tensor, w, ignore_index: int, n_cols: int) -> torch.Tensor:
    """Device 0-d fp32: sum of w[y] (count without weight) over counted rows, 0 replaced by 1."""
    valid = t != ignore_index
    if w is None:
        total = valid.sum(dtype=torch.float32)
    else:
        idx = torch.where(valid, t, torch.zeros_like(t)).long().clamp_(0, n_cols - 1)
        total = torch.where(valid, w[idx], torch.zeros((), device=w.device)).sum()
    return torch.where(total == 0, torch.ones_like(total), total)


def grad_scale(t, w, opts: CEOptions, reduction: str, n_cols: int):
    """(divisor or None, 0-d scale folded into the forward gradient)."""
    if reduction == "mean":
        divisor = mean_divisor(t, w, opts.ignore_index, n_cols)
        return divisor, 1.0 / divisor
    return None, torch.ones((), dtype=torch.float32, device=t.device)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, divisor, out_shape, dtype):
    if reduction == "none":
        return loss_rows.reshape(out_shape).to(dtype)
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / divisor
    return total.to(dtype)


def rows_view(logits: torch.Tensor):
    """[N, C] view with unit column stride (copy only if impossible) and whether it copied."""
    c = logits.shape[-1]
    x = logits.reshape(-1, c)
    if c > 1 and x.stride(1) != 1:
        x = x.contiguous()
    copied = x.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()
    return x, copied


def _bump_version(t: torch.Tensor) -> None:
    """Tell autograd that t changed in place, so stale saved copies of it are detected."""
    torch.autograd.graph.increment_version(t)


# --------------------------------------------------------------------------- autograd


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, opts, reduction, inplace_grad, backend):
        check_args(logits.shape, logits.device, target, weight, opts, reduction)
        x, copied = rows_view(logits)
        t = target.reshape(-1).contiguous()  # N ints; the kernel indexes targets densely
        w = class_weight_fp32(weight)
        n, c = x.shape
        divisor, scale = grad_scale(t, w, opts, reduction, c)
        need_grad = ctx.needs_input_grad[0]
        grad = None
        if need_grad:
            grad = x if inplace_grad else torch.empty((n, c), dtype=x.dtype, device=x.device)
        loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
        ROW_BACKENDS[backend](x, t, w, opts, scale, loss_rows, grad)
        if need_grad and inplace_grad and not copied:
            _bump_version(logits)
        # Kept on ctx, not save_for_backward: it is our own buffer (or, in place, a no-grad view
        # of the logits whose version we just bumped on purpose), not an input to re-check.
        ctx.grad, ctx.shape, ctx.backend, ctx.done = grad, logits.shape, backend, False
        return reduce_rows(loss_rows, reduction, divisor, logits.shape[:-1], logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.done:
            raise RuntimeError("kernels.cross_entropy supports one backward per forward")
        ctx.done = True
        grad, ctx.grad = ctx.grad, None  # the buffer becomes the returned gradient
        scale_rows(grad, grad_output, ctx.backend)
        return grad.reshape(ctx.shape), None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_grad: bool = False,
) -> torch.Tensor:
    """``F.cross_entropy`` on ``[..., C]`` logits (class dim last) plus an optional z-loss.

    See the module docstring for the formula, the normaliser and the ``inplace_grad`` rule.
    ``ignore_index=None``: every row counts (targets must lie in ``[0, C)``); the mean then
    divides by the row count, which saves the guard against an all-ignored batch.
    ``backend``: ``"auto"`` (Triton for CUDA tensors when it imports), ``"triton"``, ``"torch"``.
    """
    opts = make_options(ignore_index, label_smoothing, z_loss)
    chosen = pick_backend(logits, backend)
    if chosen == "torch" and not inplace_grad and logits.numel() <= SMALL_TORCH_ELEMENTS:
        check_args(logits.shape, logits.device, target, weight, opts, reduction)
        return _small_torch(logits, target, weight, opts, reduction)
    return _CrossEntropy.apply(logits, target, weight, opts, reduction, bool(inplace_grad), chosen)


# Below this many logits the fallback's fixed cost (~15 small ops per call) outweighs what its
# closed-form gradient saves, so torch's own fused loss (with its native backward) is used; a
# small classifier's step would otherwise pay ~0.1 ms per call on the CPU.
SMALL_TORCH_ELEMENTS = 1 << 18


def _small_torch(logits, target, weight, opts: CEOptions, reduction: str) -> torch.Tensor:
    """Same semantics through ``F.cross_entropy`` (sum), our device-side mean divisor, and the
    z-loss term: no NaN for an all-ignored batch, no host sync."""
    import torch.nn.functional as F

    c = logits.shape[-1]
    x = logits.reshape(-1, c).float()
    t = target.reshape(-1)
    if weight is None and opts.z_loss == 0 and reduction == "mean" and x.shape[0] > 0:
        loss = F.cross_entropy(
            x, t, ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing
        )
        if opts.ignore_index == NO_IGNORE:  # every row counts: torch's own loss, nothing added
            return loss.to(logits.dtype)
        # torch's mean is 0/0 = NaN only when every row is ignored (its gradient is then 0
        # already): select 0 for that case on the device. The common training call, 3 ops.
        counted = (t != opts.ignore_index).any()
        return torch.where(counted, loss, torch.zeros_like(loss)).to(logits.dtype)
    w = class_weight_fp32(weight)
    per_row = reduction == "none" or opts.z_loss != 0
    loss = F.cross_entropy(
        x,
        t,
        weight=w,
        ignore_index=opts.ignore_index,
        label_smoothing=opts.label_smoothing,
        reduction="none" if per_row else "sum",
    )
    if opts.z_loss != 0:
        lse = torch.logsumexp(x, dim=1)
        loss = loss + opts.z_loss * torch.where(
            t != opts.ignore_index, lse * lse, torch.zeros_like(lse)
        )
    if reduction == "none":
        return loss.reshape(logits.shape[:-1]).to(logits.dtype)
    total = loss.sum() if per_row else loss
    if reduction == "mean":
        total = total / mean_divisor(t, w, opts.ignore_index, c)
    return total.to(logits.dtype)
